"""The one update loop: passes over an epoch's Chain, in minibatches, for any objective.

    B  trajectories of the epoch (this process)   K  recorded chain steps   Kt  trained steps per trajectory
    M  rows of a minibatch                        J  steps per training forward (train.timestep_batch)

Each of ``train.update_epochs`` passes shuffles the epoch's data with that pass's generator and
cuts it into minibatches of ``train.minibatch_size`` (:func:`plan`):

- ``minibatch_unit: trajectory``: whole trajectories. An objective that trains on sampled steps
  (the PPO family, step ratios) gives each trajectory its own random subset of Kt of its
  stochastic steps (Kt = int(timestep_fraction x K), at most their count: DDPO's timestep
  subsampling; ``timestep_selection: first`` takes the first Kt in order, as Flow-GRPO),
  cut into forwards of J steps; one that needs every step in order (chain ratios, ReinFlow)
  or none (FPO) takes the rows alone.
- ``minibatch_unit: pair``: (trajectory, step) pairs shuffled across trajectories (DPPO).

An objective with ``whole_groups`` (PRDP: a loss on pairs within a prompt group) gets the prompt
groups shuffled instead of the trajectories, each group's rows together, so a minibatch of a
multiple of ``group_size`` rows holds whole groups.

With ``algorithm.drop_zero_std`` (Flow-GRPO) the trajectories of groups whose rewards are all
equal are left out: the others fill as many minibatches as all would have, each smaller.

``optim.gradient_accumulation_steps`` minibatches make one optimizer step; each forward's loss
is weighted by 1 / (accumulation x the minibatch's trained pairs), so a full accumulation cycle's
gradient is the mean over all its pairs, whatever J (a last, partial cycle keeps the same weight,
as DDPO and accelerate do). Gradients are
clipped per parameter group (the policy's, the value network's), a non-finite loss or gradient
is caught at the step with one host sync (``train.on_nonfinite``), the learning rate follows
its schedule (a pure function of the step or epoch count), EMA follows the weights, and with
``algorithm.target_kl`` an epoch stops once a minibatch's approximate KL exceeds it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.schedule import lr_factor, set_lr
from flowrl.core.seeding import OBJECTIVE
from flowrl.errors import ConfigError, NonFiniteError
from flowrl.objectives.base import Minibatch


def plan(
    chain: Chain,
    steps: str,
    unit: str,
    size: int,
    fraction: float,
    timestep_batch: int,
    accumulation: int,
    g: torch.Generator,
    selection: str = "random",
    keep: Tensor | None = None,
    groups: Tensor | None = None,
) -> list[list[Minibatch]]:
    """One pass's minibatches, each a list of forwards (see the module docstring). ``steps`` is
    the objective's ``sampled`` / ``all`` / ``none``; ``keep`` (B,) bool leaves rows out (their
    minibatches shrink, their number stays); ``groups`` (B,) shuffles whole groups, not rows;
    draws from ``g`` in a fixed order."""
    B, K = len(chain), chain.num_steps
    if unit == "pair":
        stochastic = torch.isfinite(chain.log_probs)
        if not bool(stochastic.all()):
            raise ConfigError(
                "train.minibatch_unit=pair needs every recorded step stochastic (DPPO's chain), but this sampler "
                "records deterministic steps; set train.minibatch_unit=trajectory"
            )
        perm = torch.randperm(B * K, generator=g)
        return [
            [Minibatch(perm[i : i + size] // K, (perm[i : i + size] % K)[:, None], 1.0 / accumulation)]
            for i in range(0, B * K, size)
        ]
    if groups is None:
        perm = torch.randperm(B, generator=g)
    else:  # the groups in a random order, each group's rows together (in their order)
        ids, which = torch.unique(groups.cpu(), return_inverse=True)
        order = torch.randperm(len(ids), generator=g)
        perm = torch.cat([torch.nonzero(which == i).flatten() for i in order.tolist()])
    chunks = _chunks(B, size, keep[perm] if keep is not None else None)  # positions into perm
    if steps == "none":
        return [
            [Minibatch(perm[c], torch.zeros(len(c), 0, dtype=torch.long), 1.0 / accumulation)] for c in chunks
        ]
    if steps == "all":
        # every stochastic step, in order; deterministic steps (LCM's, CPS's last, outside an SDE
        # window) carry no log-prob and are left out, which needs them at the same columns in every row
        stochastic = torch.isfinite(chain.log_probs).cpu()  # (B, K)
        columns = stochastic.all(0)
        if not bool((stochastic == columns).all()):
            raise ConfigError(
                "this objective trains every step of a chain in order, but the rows' stochastic steps differ "
                "(an SDE window drawn per batch); set algorithm.ratio_scope=step, or sampler.window_max_start=0 "
                "for a fixed window"
            )
        every = torch.nonzero(columns).flatten()
        return [[Minibatch(perm[c], every.expand(len(c), len(every)), 1.0 / accumulation)] for c in chunks]
    # each trajectory trains on Kt of its stochastic steps (those with a log-prob: all K for DDIM,
    # the SDE window for Flow-GRPO-Fast): its own random subset, or its first Kt in order: (B, Kt)
    stochastic = torch.isfinite(chain.log_probs).cpu()  # (B, K)
    Kt = max(1, min(int(stochastic.sum(1).min()), int(fraction * K)))
    J = min(timestep_batch or Kt, Kt)
    if selection == "first":
        scores = torch.arange(K, dtype=torch.float32).expand(B, K)
    else:
        scores = torch.rand(B, K, generator=g)
    scores = scores.masked_fill(~stochastic[perm], float(K + 1))
    chosen = torch.argsort(scores, dim=1, stable=True)[:, :Kt]
    out = []
    for c in chunks:
        rows, cols = perm[c], chosen[c]
        out.append(
            [
                Minibatch(rows, cols[:, j : j + J], cols[:, j : j + J].shape[1] / (Kt * accumulation))
                for j in range(0, Kt, J)
            ]
        )
    return out


def _chunks(B: int, size: int, keep: Tensor | None) -> list[Tensor]:
    """Positions 0..B-1 cut into minibatches of ``size``; with a ``keep`` mask (B,) that drops
    some rows (Flow-GRPO's zero-std groups), the kept positions cut into as many minibatches, each
    smaller (so every process takes the same number of steps). Too few kept rows: keep them all."""
    n = -(-B // size)
    if keep is None or bool(keep.all()) or int(keep.sum()) < n:
        return [torch.arange(i, min(i + size, B)) for i in range(0, B, size)]
    return list(torch.tensor_split(torch.nonzero(keep).flatten(), n))


def update(run, chain: Chain, epoch: int) -> dict:
    """``train.update_epochs`` passes of the run's objective over the epoch's Chain; returns the
    diagnostics averaged over forwards, and the loop's own (grad norms, learning rates, steps)."""
    cfg, acc, objective = run.cfg, run.accelerator, run.objective
    if hasattr(objective, "update"):  # an objective with its own update (DSRL-SAC: from its replay buffer)
        return objective.update(run, chain, epoch)
    t, o, a = cfg.train, cfg.optim, cfg.algorithm
    accumulation = o.gradient_accumulation_steps
    fraction = getattr(a.options, "timestep_fraction", 1.0)
    with acc.autocast():  # the old losses under the same precision as the new ones (FPO's ratio 1)
        objective.prepare(chain, epoch, run.seeds.generator(epoch, OBJECTIVE))
    groups = [g["params"] for g in run.optimizer.param_groups]
    sums: dict[str, Tensor] = {}
    count, skipped, scaler_skips, updates, stopped_early = 0, 0, 0, 0, False
    grad_norms: list[list[Tensor]] = [[] for _ in groups]
    for pass_, g in enumerate(run.seeds.update_generators(epoch, t.update_epochs)):
        minibatches = plan(
            chain,
            objective.steps,
            t.minibatch_unit,
            t.minibatch_size,
            fraction,
            t.timestep_batch,
            accumulation,
            g,
            getattr(a.options, "timestep_selection", "random"),
            chain.metadata.get("keep"),
            chain.metadata["group"] if getattr(objective, "whole_groups", False) else None,
        )
        bad = torch.zeros((), dtype=torch.bool, device=run.device)
        step_kl: list[Tensor] = []
        for i, forwards in enumerate(minibatches):
            last_of_cycle = (i + 1) % accumulation == 0 or i == len(minibatches) - 1
            for j, mb in enumerate(forwards):
                sync = last_of_cycle and j == len(forwards) - 1
                ctx = acc.no_sync(run.modules) if not sync and run.world > 1 else contextlib.nullcontext()
                with ctx, acc.autocast():
                    terms = run.modules(lambda mb=mb, g=g: objective.loss(chain, mb, epoch, g))
                    bad |= ~torch.isfinite(terms["loss"])
                    acc.backward(terms["loss"] * mb.weight)
                for k, v in terms.items():
                    sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
                count += 1
                if "approx_kl" in terms:
                    step_kl.append(terms["approx_kl"].detach())
            if not last_of_cycle:
                continue
            status = optimizer_step(run, groups, bad, grad_norms, epoch, pass_, i)
            step_kl, kl = [], torch.stack(step_kl).mean() if step_kl else None
            if status == "overflow":
                scaler_skips += 1
                continue
            if status == "skipped":
                skipped += 1
                bad.zero_()
                continue
            updates += 1
            if a.target_kl is not None and kl is not None and float(kl) > a.target_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    check_weights(run)
    out = {k: (v / count).item() for k, v in sums.items()}
    names = ["grad_norm", "grad_norm_value"]
    for name, norms in zip(names, grad_norms):
        out[name] = torch.stack(norms).mean().item() if norms else float("nan")
    out["lr"] = run.optimizer.param_groups[0]["lr"]  # of the epoch's last optimizer step
    if len(run.optimizer.param_groups) > 1:
        out["lr_value"] = run.optimizer.param_groups[1]["lr"]
    out["updates"] = updates
    if a.target_kl is not None:
        out["stopped_early"] = stopped_early
    if skipped:
        out["skipped_updates"] = skipped
    if scaler_skips:
        out["fp16_overflow_steps"] = scaler_skips
    return out


def optimizer_step(
    run,
    groups: list[list],
    bad: Tensor,
    grad_norms: list[list[Tensor]],
    epoch: int,
    pass_: int,
    minibatch: int,
) -> str:
    """Clip each parameter group's gradient, check the step is finite (one host sync), set the
    scheduled learning rate and step. Returns ``stepped``, ``overflow`` (fp16's loss scale backed
    off: the scaler skipped the step) or ``skipped`` (non-finite, ``train.on_nonfinite=skip``)."""
    cfg, acc, opt = run.cfg, run.accelerator, run.optimizer
    o = cfg.optim
    acc.unscale_gradients()
    norms = [torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm) for params in groups]
    grads_ok = torch.isfinite(torch.stack(norms)).all() & ~bad
    previous = getattr(run, "weights_check", None)  # the last step's updated weights, not read yet
    if previous is None:
        finite = bool(grads_ok)  # the one host sync per update
    else:  # read with this step's flag: still one host sync per update
        finite, weights_ok = torch.stack([grads_ok, previous[0]]).tolist()
        run.weights_check = None
        if not weights_ok:
            raise_nonfinite_weights(run, *previous[1])
    if not finite and acc.scaler is not None and not bad.item():
        # fp16 loss scaling (CUDA): an overflowing gradient is how the scaler finds its scale too
        # high. Its step skips the update and lowers the scale; the step count, learning rate and
        # EMA stay where they are.
        opt.step()
        opt.zero_grad(set_to_none=True)
        return "overflow"
    if not finite:
        opt.zero_grad(set_to_none=True)
        what = "loss" if bad.item() else "gradient norm"
        run.nonfinite(
            f"non-finite {what} at epoch {epoch}, update pass {pass_}, minibatch {minibatch}",
            "check the reward and lower optim.learning_rate",
        )
        return "skipped"
    unit_step = epoch if cfg.lr_schedule_unit == "epoch" else run.global_step
    set_lr(
        opt,
        run.base_lrs,
        lr_factor(unit_step, run.schedule_steps, o.lr_warmup, o.lr_schedule, o.lr_final_ratio),
    )
    opt.step()
    opt.zero_grad(set_to_none=True)
    run.global_step += 1
    # the updated weights' finiteness as a device flag (one fused max-abs norm per parameter group),
    # read at the next step's host sync or at the end of the update, before anything is saved
    run.weights_check = (
        weights_finite(groups),
        (epoch, pass_, minibatch, run.global_step, opt.param_groups[0]["lr"]),
    )
    for store, norm in zip(grad_norms, norms):
        store.append(norm.detach())
    if run.ema is not None:
        run.ema.update(run.adapter.trainable_state_dict())
    return "stepped"


def weights_finite(groups: list[list]) -> Tensor:
    """A () bool tensor on the parameters' device: every trained parameter is finite (NaN and inf
    survive a max-abs norm; one fused ``_foreach_norm``, no host sync)."""
    params = [p.detach() for params in groups for p in params]
    norms = torch._foreach_norm(params, ord=float("inf"))
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def check_weights(run) -> None:
    """Read the last optimizer step's weight check (at the end of an update, before any save)."""
    previous = getattr(run, "weights_check", None)
    run.weights_check = None
    if previous is not None and not bool(previous[0]):
        raise_nonfinite_weights(run, *previous[1])


def raise_nonfinite_weights(run, epoch: int, pass_: int, minibatch: int, step: int, lr: float) -> None:
    """A step made weights NaN/inf: always stop (there is nothing to skip back to), nothing saved."""
    raise NonFiniteError(
        f"the optimizer step at epoch {epoch}, update pass {pass_}, minibatch {minibatch} (global step {step}) made "
        f"trained weights non-finite (NaN or inf) at learning rate {lr:g}; the run stopped before saving them: "
        "lower optim.learning_rate (or optim.max_grad_norm), and resume from the last checkpoint"
    )

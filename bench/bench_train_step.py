"""Distance from the physical limit: one training epoch's update phase vs the network's own
forward+backward for the same (trajectory, step) pairs.

One fixed sampled epoch (tiny SD, 32x32, DDIM eta 1, K steps, DDPO, JPEG reward) is trained by
``flowrl.train.update`` in three ways, alternating A B C A B C ... after warmup:

    per-step   train.timestep_batch=1: one forward+backward per denoising step, as DDPO and trl
               do (each forward carries train_batch_size pairs)
    batched    train.timestep_batch=0: all K steps of a minibatch in one forward
               (train_batch_size x K pairs), the default
    limit      the bare network: for each minibatch, one forward of the same train_batch_size x K
               (latent, timestep, text) inputs, a scalar loss, backward, an AdamW step; no
               sampler, no log-probs, no PPO, no bookkeeping

The table gives seconds per epoch update (median) and the ratios per-step / limit and
batched / limit (issue 9's target: batched / limit <= 1.15), and per-step / batched, the gain of
timestep batching itself.

With ``--compile`` a fourth trainer runs with ``train.compile=true`` (the denoiser compiled in
place by torch.compile; compile time is spent in the warmup and reported) and the sampling phase
(the collector's ``collect``) is timed too, eager vs compiled.

    python bench/bench_train_step.py [--steps 10] [--samples 32] [--train-batch 8] [--lora 4] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _cpu_load import ForeignCPU, wait_for_quiet  # bench/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="denoising steps K (all trained)")
    ap.add_argument("--samples", type=int, default=32, help="trajectories per epoch")
    ap.add_argument("--train-batch", type=int, default=8, help="trajectories per minibatch")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-timeout", type=float, default=60.0)
    ap.add_argument("--compile", action="store_true", help="also time a trainer with train.compile=true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    from flowrl.config import load_config, tasks_dir
    from flowrl.run import Run
    from flowrl.train import update

    out = tempfile.mkdtemp(prefix="flowrl-bench-")
    finetune = f"model.finetune={'lora' if args.lora else 'full'}"
    common = [
        finetune,
        f"model.lora_rank={max(args.lora, 1)}",
        f"sampler.num_steps={args.steps}",
        f"sampler.guidance_scale={args.cfg}",
        f"train.sample_batch_size={args.samples}",
        "train.num_batches_per_epoch=1",
        f"train.minibatch_size={args.train_batch}",
        f"train.output_dir={out}",
        "train.async_reward=false",
    ]
    trainers = {
        name: Run(
            load_config(str(tasks_dir() / "jpeg_tiny.yaml"), common + [f"train.timestep_batch={j}"]), name
        )
        for name, j in (("per-step", 1), ("batched", 0))
    }
    if args.compile:
        trainers["compiled"] = Run(
            load_config(
                str(tasks_dir() / "jpeg_tiny.yaml"), common + ["train.timestep_batch=0", "train.compile=true"]
            ),
            "compiled",
        )
    ref = trainers["batched"]
    chain = ref.collector.collect(0)[0]
    chain.advantages, _ = ref.collector.advantages(chain)
    B, K, Bm = len(chain), chain.num_steps, args.train_batch

    # the bare network on the same inputs: minibatch by minibatch, Bm x K pairs per forward
    net = ref.adapter.denoiser
    params = ref.adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-6)
    pairs_x = chain.latents[:, :-1].reshape(B * K, *chain.latents.shape[2:])  # (B*K, C, H, W)
    pairs_t = chain.timesteps.reshape(B * K)
    pairs_cond = {k: v.repeat_interleave(K, 0) for k, v in chain.cond.items()}

    def limit() -> None:
        net.train()
        for mb in range(B // Bm):
            sl = slice(mb * Bm * K, (mb + 1) * Bm * K)
            cond = {k: v[sl] for k, v in pairs_cond.items()}
            loss = ref.adapter(pairs_x[sl], pairs_t[sl], cond, args.cfg).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    runs = {
        "per-step": lambda: update(trainers["per-step"], chain, 0),
        "batched": lambda: update(trainers["batched"], chain, 0),
        "limit": limit,
    }
    if args.compile:
        runs["compiled"] = lambda: update(trainers["compiled"], chain, 0)
        runs["sample eager"] = lambda: ref.collector.collect(1)[0]
        runs["sample compiled"] = lambda: trainers["compiled"].collector.collect(1)[0]
    warm: dict[str, float] = {}
    for _ in range(args.warmup):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            warm[name] = warm.get(name, 0.0) + time.perf_counter() - t0
    wait_for_quiet(timeout_s=args.quiet_timeout)
    times: dict[str, list[float]] = {k: [] for k in runs}
    with ForeignCPU() as busy:
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    what = f"LoRA r{args.lora}" if args.lora else "full fine-tuning"
    print(
        f"\nupdate phase of one epoch: tiny SD 32x32, {B} trajectories x K={K} steps, minibatch {Bm}, "
        f"{what}, CFG {args.cfg}, CPU x{args.threads} threads, torch {torch.__version__}; "
        f"median of {args.reps} interleaved reps\n"
    )
    print("| run | s / epoch | vs limit | min (s) |")
    print("|---|---:|---:|---:|")
    for name in runs:
        if not name.startswith("sample"):
            print(f"| {name} | {med[name]:.3f} | {med[name] / med['limit']:.3f} | {min(times[name]):.3f} |")
    print(f"\ntimestep batching: per-step / batched = {med['per-step'] / med['batched']:.2f}x")
    if args.compile:
        print(
            f"torch.compile: update batched / compiled = {med['batched'] / med['compiled']:.2f}x, "
            f"sampling eager / compiled = {med['sample eager'] / med['sample compiled']:.2f}x "
            f"({med['sample eager']:.3f} vs {med['sample compiled']:.3f} s per sampled epoch); "
            f"warmup (compiling) took {warm['compiled'] + warm['sample compiled']:.0f} s "
            f"vs {warm['batched'] + warm['sample eager']:.0f} s eager"
        )
    note = "  WARNING: timings disturbed, rerun on a quiet machine" if busy.cores > 0.3 else ""
    print(f"most CPU used by other processes while timing: {busy.cores:.2f} cores{note}")


if __name__ == "__main__":
    main()

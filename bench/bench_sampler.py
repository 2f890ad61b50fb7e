"""flowrl's DDIM sampler vs a bare diffusers pipeline call: same model, same steps, same eta.

Both sides run on the same tiny Stable Diffusion pipeline (``build_tiny_sd_pipeline``, random
weights, 32x32 images), K DDIM steps at eta=1.0, and both include VAE decoding:

    flowrl:    DDIMSampler(...).sample(adapter, prompts, g)  +  adapter.decode(latents[:, -1])
               (also records the whole chain and each step's log-prob, which training needs)
    diffusers: pipe(prompts, num_inference_steps=K, guidance_scale=g, eta=1.0, output_type="pt")

Calls alternate A B A B ... after warmup so that drift in machine load hits both sides alike;
the table reports the median seconds per call and the ratio flowrl / diffusers (< 1: flowrl is
faster). Runs on the CPU with 2 threads.

    python bench/bench_sampler.py [--batch 8] [--steps 20] [--reps 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _cpu_load import ForeignCPU, wait_for_quiet  # bench/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per side and setting")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per side first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-timeout", type=float, default=60.0, help="seconds to wait for a quiet machine")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    from flowrl.models.sd import StableDiffusionAdapter, build_tiny_sd_pipeline
    from flowrl.samplers import DDIMSampler

    pipe = build_tiny_sd_pipeline()
    # the same DDIM schedule on both sides (the tiny pipeline already uses DDIM; made explicit here)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    adapter = StableDiffusionAdapter(pipe, finetune="frozen")
    sampler = DDIMSampler(pipe.scheduler.config, num_steps=args.steps, eta=1.0)

    base = ["a red square", "a green square", "a blue square", "a yellow square"]
    prompts = [base[i % len(base)] for i in range(args.batch)]

    @torch.no_grad()
    def run_flowrl(g: float) -> torch.Tensor:
        chain = sampler.sample(adapter, prompts, g, generator=torch.Generator().manual_seed(0))
        return adapter.decode(chain.latents[:, -1])

    @torch.no_grad()
    def run_diffusers(g: float) -> torch.Tensor:
        return pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=g,
            eta=1.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    def timed(fn, g: float) -> float:
        t0 = time.perf_counter()
        out = fn(g)
        dt = time.perf_counter() - t0
        assert out.shape == (args.batch, 3, 32, 32), out.shape
        return dt

    rows = []
    foreign = 0.0
    for g in args.cfg:
        for _ in range(args.warmup):
            run_flowrl(g)
            run_diffusers(g)
        times = {"flowrl": [], "diffusers": []}
        wait_for_quiet(
            timeout_s=args.quiet_timeout
        )  # other work on the machine skews timings: wait for it, and measure it
        with ForeignCPU() as busy:
            for _ in range(args.reps):  # interleaved: A B A B ...
                times["flowrl"].append(timed(run_flowrl, g))
                times["diffusers"].append(timed(run_diffusers, g))
        foreign = max(foreign, busy.cores)
        f, d = statistics.median(times["flowrl"]), statistics.median(times["diffusers"])
        rows.append((g, f, d, f / d, min(times["flowrl"]), min(times["diffusers"])))

    print(
        f"\nsampling + VAE decode, tiny SD (32x32), batch {args.batch}, K={args.steps} DDIM steps, eta=1.0, "
        f"CPU x{args.threads} threads, torch {torch.__version__}; median of {args.reps} interleaved reps "
        f"after {args.warmup} warmup each\n"
    )
    print("| CFG | flowrl (s) | diffusers (s) | flowrl / diffusers | min flowrl (s) | min diffusers (s) |")
    print("|----:|-----------:|--------------:|------------------:|---------------:|------------------:|")
    for g, f, d, r, fmin, dmin in rows:
        print(f"| {g:3.1f} | {f:10.4f} | {d:13.4f} | {r:17.3f} | {fmin:14.4f} | {dmin:17.4f} |")
    note = "  WARNING: timings disturbed, rerun on a quiet machine" if foreign > 0.3 else ""
    print(f"\nmost CPU used by other processes while timing: {foreign:.2f} cores{note}")


if __name__ == "__main__":
    main()

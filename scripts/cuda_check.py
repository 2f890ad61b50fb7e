"""The GPU checks in one short run, for a session that is lent a GPU (the test suite runs on CPU).

    python scripts/cuda_check.py [--device cuda] [--skip-train]

1. Every family's tiny pipeline on the device, in float32 and in the low precisions: sample a
   chain with per-step log-probs, re-evaluate every transition (the on-policy ratio must be 1),
   decode (finite images). CFG on where the family uses it.
2. The run shell on the device for 2 epochs of the tiny JPEG task under train.mixed_precision no,
   bf16 and fp16 (fp16 runs behind accelerate's GradScaler on CUDA): finite metrics, a
   checkpoint, and a resume that continues it.
3. The digits quickstart's before-measurement on the device against the README's CPU numbers
   (same CPU-seeded noise; a GPU's arithmetic may move the third decimal).

Prints one line per check and exits 1 if any failed. Runs on a CPU too (as a dry run of itself).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback

import torch

RESULTS: list[tuple[str, bool, str]] = []


def run_check(name: str, fn, *args) -> None:
    """Run one check, record and print its outcome; a failure is reported and the run goes on."""
    t0 = time.perf_counter()
    try:
        RESULTS.append((name, True, fn(*args) or ""))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS.append((name, False, f"{type(e).__name__}: {e}"[:300]))
    ok, detail = RESULTS[-1][1:]
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.1f} s) {detail}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-train", action="store_true", help="only the sampler checks")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    from flowrl.models import FAMILIES, build_adapter, load_pipeline
    from flowrl.samplers import build_sampler

    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])

    def sampler_check(family: str, dtype: torch.dtype) -> str:
        adapter = build_adapter(load_pipeline("tiny", family), family, "lora", 4, weight_dtype=dtype)
        adapter = adapter.to(device)
        sampler = build_sampler(FAMILIES[family].samplers[0], adapter.scheduler_config, 4, eta=1.0)
        cfg = 1.0 if family in ("lcm", "flux") else 3.0
        prompts = ["a red square", "a cat"]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            chain = sampler.sample(adapter, prompts, cfg, generator=torch.Generator().manual_seed(0))
            worst = 0.0
            for k in range(chain.num_steps):
                if not torch.isfinite(chain.log_probs[:, k]).all():
                    continue  # a deterministic step (LCM's last)
                new = sampler.log_prob(adapter, chain, torch.full((len(chain),), k)).log_prob
                worst = max(worst, (new - chain.log_probs[:, k]).abs().max().item())
            images = adapter.decode(chain.latents[:, -1])
        assert torch.isfinite(images).all(), "non-finite images"
        assert worst < (1e-4 if dtype == torch.float32 else 5e-2), f"on-policy |log ratio| {worst:.2e}"
        return f"max |log ratio| {worst:.1e}"

    for family in ("sd", "sdxl", "sd3", "lcm", "flux"):
        for dtype in dtypes:
            run_check(f"sampler {family} {str(dtype).replace('torch.', '')}", sampler_check, family, dtype)

    if not args.skip_train:
        from flowrl.config import load_config, tasks_dir
        from flowrl.run import Run

        out = tempfile.mkdtemp(prefix="flowrl-cuda-check-")
        small = ["sampler.num_steps=4", "train.sample_batch_size=8", "train.minibatch_size=8"]
        small += ["train.eval_every=1", "train.save_every=1", f"train.output_dir={out}"]
        task = str(tasks_dir() / "jpeg_tiny.yaml")

        def trainer_check(precision: str) -> str:
            run = [*small, f"train.mixed_precision={precision}", f"train.run_name=precision-{precision}"]
            history = Run(load_config(task, [*run, "train.num_epochs=2"]), precision).train()
            resumed = Run(load_config(task, [*run, "train.num_epochs=3", "train.resume=auto"]), precision)
            assert resumed.start_epoch == 2 and resumed.device.type == device.type
            history += resumed.train()
            floats = [v for r in history for v in r.values() if isinstance(v, float)]
            assert all(v == v for v in floats), "NaN in the metrics"
            overflow = sum(r.get("fp16_overflow_steps", 0) for r in history)
            rewards = [round(r["reward_mean"], 4) for r in history if "reward_mean" in r]
            return f"rewards {rewards}, fp16 overflow steps {overflow}"

        for precision in ("no", "bf16", "fp16"):
            run_check(f"trainer jpeg_tiny mixed_precision={precision}", trainer_check, precision)

        def digits_check() -> str:
            from flowrl.demo.digits import load_digits_pipeline
            from flowrl.demo.quickstart import measure_alignment
            from flowrl.models.sd import StableDiffusionAdapter

            adapter = StableDiffusionAdapter(load_digits_pipeline(), finetune="frozen").to(device)
            config = adapter.scheduler_config
            got = [measure_alignment(adapter, config, 10, eta, seed=1000)["alignment"] for eta in (0.0, 1.0)]
            assert abs(got[0] - 0.713) < 0.02 and abs(got[1] - 0.878) < 0.02, got
            return f"{got[0]:.4f} / {got[1]:.4f}"

        run_check("digits before-measurement vs README (0.713 eta 0, 0.878 eta 1)", digits_check)

        shutil.rmtree(out, ignore_errors=True)

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(
        f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

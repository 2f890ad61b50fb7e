"""Scaling: time and peak memory of one epoch as functions of denoising steps, batch size, image
size and LoRA rank; training memory with and without gradient checkpointing.

Each point runs in its own process (so its peak memory is its own) on the tiny SD of
tasks/jpeg_tiny.yaml with one change from the base point (K=10 DDIM steps, 16 trajectories,
minibatch 8, 32x32 images, LoRA rank 4, all steps per forward):

    sample_s   sampling the epoch's trajectories with log-probs (+ decode, reward)
    train_s    the update phase (median of the timed epochs after a warm-up epoch)
    train_mb   peak memory of the update phase above what sampling and setup needed: CUDA
               max_memory_allocated on a GPU; on the CPU the growth of the process's peak
               resident set (ru_maxrss), a coarse but honest proxy

Each point waits for a quiet machine, records the cores other processes used while it ran, and
is repeated once if that exceeds --max-foreign (the table's last column). Writes scaling.md and
scaling.png to --out and prints the table.

    python bench/bench_scaling.py [--out bench/out] [--quick] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE = {"steps": 10, "batch": 16, "size": 32, "rank": 4, "ckpt": False, "timestep_batch": 0}
SWEEPS = {
    "steps": [5, 10, 20, 40],
    "batch": [8, 16, 32, 64],
    "size": [32, 64, 128],
    "rank": [4, 16, 64, 0],  # 0 = full fine-tuning
    "ckpt": [False, True],
}
QUICK = {"steps": [5, 10], "batch": [8, 16], "size": [32, 64], "rank": [4, 0], "ckpt": [False, True]}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def one(point: dict, threads: int, epochs: int = 2) -> dict:
    """Measure one point in this process."""
    import tempfile

    import torch

    torch.set_num_threads(threads)
    from flowrl.config import load_config, tasks_dir
    from flowrl.run import Run
    from flowrl.train import update

    overrides = [
        f"model.finetune={'lora' if point['rank'] else 'full'}",
        f"model.lora_rank={max(point['rank'], 1)}",
        f"model.tiny_image_size={point['size']}",
        f"sampler.num_steps={point['steps']}",
        f"train.sample_batch_size={point['batch']}",
        "train.num_batches_per_epoch=1",
        f"train.minibatch_size={min(8, point['batch'])}",
        f"train.timestep_batch={point['timestep_batch']}",
        f"train.gradient_checkpointing={str(point['ckpt']).lower()}",
        f"train.output_dir={tempfile.mkdtemp(prefix='flowrl-scaling-')}",
        "train.async_reward=false",
    ]
    trainer = Run(load_config(str(tasks_dir() / "jpeg_tiny.yaml"), overrides), "scaling")
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def epoch(e: int) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        chain = trainer.collector.collect(e)[0]
        chain.advantages, _ = trainer.collector.advantages(chain)
        sync()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
        update(trainer, chain, e)
        sync()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
        return t1 - t0, time.perf_counter() - t1, peak - before

    _, _, mem = epoch(0)  # the first epoch sets the peak (CPU ru_maxrss is monotonic)
    timed = [epoch(e) for e in range(1, epochs + 1)]
    return {
        **point,
        "sample_s": statistics.median(t[0] for t in timed),
        "train_s": statistics.median(t[1] for t in timed),
        "train_mb": mem,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--quick", action="store_true", help="two values per axis")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--epochs", type=int, default=2, help="timed epochs per point (median), after one warm-up"
    )
    ap.add_argument(
        "--max-foreign", type=float, default=0.3, help="repeat a point once above this many foreign cores"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one), args.threads, args.epochs)))
        return

    from _cpu_load import ForeignCPU, wait_for_quiet  # bench/ is on sys.path when run as a script

    sweeps = QUICK if args.quick else SWEEPS
    results: dict[str, list[dict]] = {}
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--epochs", str(args.epochs), "--one"]
    for axis, values in sweeps.items():
        for v in values:
            point = {**BASE, axis: v}
            for _attempt in range(2):  # a disturbed point is measured once more
                wait_for_quiet(timeout_s=60)
                with ForeignCPU() as busy:
                    proc = subprocess.run(
                        cmd + [json.dumps(point)],
                        capture_output=True,
                        text=True,
                        env={**os.environ, "HF_HUB_OFFLINE": "1"},
                    )
                if busy.cores < args.max_foreign:
                    break
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"point {point} failed:\n{proc.stderr[-3000:]}")
            r = {**json.loads(line[0][7:]), "foreign": busy.cores}
            results.setdefault(axis, []).append(r)
            print(
                f"{axis}={v}: sample {r['sample_s']:.2f} s, train {r['train_s']:.2f} s, +{r['train_mb']:.0f} MB "
                f"(other processes: {busy.cores:.2f} cores)",
                flush=True,
            )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| axis | value | sample (s) | train (s) | train peak memory (MB) | foreign cores |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for axis, rows in results.items():
        for r in rows:
            v = r[axis] if axis != "rank" or r[axis] else "full"
            lines.append(
                f"| {axis} | {v} | {r['sample_s']:.2f} | {r['train_s']:.2f} | {r['train_mb']:.0f} | {r['foreign']:.2f} |"
            )
    table = "\n".join(lines)
    (out / "scaling.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(3.2 * len(results), 5.5), dpi=100)
    for col, (axis, rows) in enumerate(results.items()):
        xs = [str(r[axis]) if axis != "rank" or r[axis] else "full" for r in rows]
        axes[0, col].plot(xs, [r["sample_s"] for r in rows], "o-", label="sample")
        axes[0, col].plot(xs, [r["train_s"] for r in rows], "s-", label="train")
        axes[1, col].plot(xs, [r["train_mb"] for r in rows], "o-", color="C2")
        axes[0, col].set_title(axis)
        axes[1, col].set_xlabel(axis)
    axes[0, 0].set_ylabel("seconds / epoch")
    axes[1, 0].set_ylabel("train peak memory (MB)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png")
    print("\n" + table + f"\n\nwritten: {out / 'scaling.md'}, {out / 'scaling.png'}")


if __name__ == "__main__":
    main()

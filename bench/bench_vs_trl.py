"""DDPO training throughput: flowrl vs trl 0.11.4's DDPOTrainer, same model, same settings.

One DDPO epoch = sample (DDIM eta=1, with per-step log-probs) + JPEG-compressibility reward +
per-prompt advantages + PPO-clip update over every denoising step. Throughput is samples per
second of whole epochs; the first epoch of every run is warmup and is left out.

Both sides load the same tiny Stable Diffusion (flowrl's ``build_tiny_sd_pipeline``, saved to a
local folder from this venv; parameter checksums are compared) and use identical settings:
10 DDIM steps, eta 1.0, sample batch 8 x 2 batches per epoch, train batch 8, LoRA rank 4 (alpha 4,
gaussian init) on to_q/to_k/to_v/to_out.0, timestep_fraction 1.0, 1 inner epoch, gradient
accumulation 1, PPO clip 1e-4, advantage clip 5, per-prompt stat tracking (buffer 32, min 16),
AdamW lr 1e-3, rewards computed synchronously, fp32, CPU, 2 torch threads, no checkpoints or
evaluation inside the timed epochs.

    flowrl: flowrl.run.Run on tasks/jpeg_tiny.yaml with overrides, in this venv;
            per-epoch time from its history rows (time_collect + time_update).
    trl:    bench/_trl_ddpo_worker.py with /work/main/.venv-trl/bin/python (make it with
            bench/setup_trl_env.sh); each trainer.step(epoch, global_step) call timed.

Each side runs in a fresh subprocess; runs alternate flowrl/trl (order flipped every round).

Classifier-free guidance: trl 0.11.4 cannot sample at guidance_scale <= 1 with any diffusers that
has ``unet.add_adapter`` (>= 0.22, which its LoRA path needs): DDPOTrainer always passes
negative_prompt_embeds, and diffusers' deprecated ``_encode_prompt`` then concatenates
[negative, positive] whether or not CFG is on, so the UNet gets 2B text embeddings for B latents
and fails with a shape error. So the main setting is CFG 5.0 on both sides (trl's train_cfg and
flowrl both run the doubled-batch guided UNet in the update too). For CFG 1.0 the trl worker
restores the pre-0.22 ``_encode_prompt`` behaviour (concatenate only under CFG), a shim that
changes no compute; that row is marked.

    python bench/bench_vs_trl.py [--guidance 5.0 1.0] [--rounds 2] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _cpu_load import ForeignCPU, wait_for_quiet  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
TRL_PYTHON = REPO / ".venv-trl" / "bin" / "python"
PROMPTS = ["a red square", "a green square", "a blue square", "a yellow square"]  # flowrl's "colors" set

# identical settings on both sides (see the module docstring)
SETTINGS = dict(
    num_steps=10,
    eta=1.0,
    sample_batch_size=8,
    num_batches_per_epoch=2,
    train_batch_size=8,
    lora_rank=4,
    learning_rate=1e-3,
    clip_range=1e-4,
    adv_clip_max=5.0,
    stat_buffer_size=32,
    stat_min_count=16,
    seed=0,
)


def prepare_folder(folder: Path) -> dict:
    """Save the tiny pipeline as a diffusers folder both sides load; return parameter checksums."""
    import torch

    from flowrl.models.sd import build_tiny_sd_pipeline
    from flowrl.models.tokenizer import clip_tokenizer_files

    pipe = build_tiny_sd_pipeline()
    pipe.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; transformers 4.46 (trl's) loads CLIPTokenizer from
    # vocab.json + merges.txt. The same files flowrl derived the tokenizer from, so ids match.
    for f in clip_tokenizer_files():
        shutil.copy(f, folder / "tokenizer" / Path(f).name)
    with torch.no_grad():
        return {
            name: float(sum(p.double().sum() for p in getattr(pipe, name).parameters()))
            for name in ("unet", "vae", "text_encoder")
        }


# ---------------------------------------------------------------------- flowrl side (subprocess)
def flowrl_worker(args: dict) -> None:
    """One flowrl training run; prints ``FLOWRL_RESULT {...}`` with its per-epoch history."""
    import torch

    torch.set_num_threads(args["threads"])
    import diffusers

    from flowrl.config import load_config
    from flowrl.run import Run

    s = SETTINGS
    cfg = load_config(
        str(REPO / "tasks" / "jpeg_tiny.yaml"),
        [
            f"model.pretrained={args['pretrained']}",
            "model.finetune=lora",  # the task file trains the full UNet; both sides use LoRA here
            f"model.lora_rank={s['lora_rank']}",
            f"sampler.num_steps={s['num_steps']}",
            f"sampler.eta={s['eta']}",
            f"sampler.guidance_scale={args['guidance_scale']}",
            f"train.num_epochs={args['num_epochs']}",
            f"train.sample_batch_size={s['sample_batch_size']}",
            f"train.num_batches_per_epoch={s['num_batches_per_epoch']}",
            f"train.minibatch_size={s['train_batch_size']}",
            "train.prompts=colors",
            "train.async_reward=false",  # trl scores synchronously by default
            "train.eval_every=0",
            "train.save_every=0",
            f"train.seed={s['seed']}",
            f"train.output_dir={args['output_dir']}",
            "train.run_name=x",
            f"optim.learning_rate={s['learning_rate']}",
            "optim.gradient_accumulation_steps=1",
            f"algorithm.clip_range={s['clip_range']}",
            f"algorithm.adv_clip_max={s['adv_clip_max']}",
            f"algorithm.stat_buffer_size={s['stat_buffer_size']}",
            f"algorithm.stat_min_count={s['stat_min_count']}",
            "algorithm.timestep_fraction=1.0",
            "train.update_epochs=1",
            "train.timestep_batch=0",  # all steps of a minibatch per forward (the same gradient as trl's loop)
        ],
    )
    trainer = Run(cfg)
    n_trainable = sum(p.numel() for p in trainer.adapter.trainable_parameters())
    history = trainer.train()
    rows = [
        {
            "epoch": r["epoch"],
            "samples": r["samples"],
            "time": r["time_collect"] + r["time_update"],
            "time_sample": r["time_collect"],
            "time_train": r["time_update"],
            "samples_per_s": r["samples_per_s"],
        }
        for r in history
        if "samples" in r  # the epochs' rows (row 0 is the evaluation before training)
    ]
    out = {
        "rows": rows,
        "trainable_params": n_trainable,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    print("FLOWRL_RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------- the network's own limit
def limit_worker(args: dict) -> None:
    """The networks alone doing one epoch's compute, with no trainer around them; prints
    ``LIMIT_RESULT {...}`` in the same row format as the two trainers.

    Per epoch: for each sampling batch, the text encoder on the (negative +) positive prompts, K
    UNet forwards of the (CFG-doubled) batch in inference mode, one VAE decode; then for each
    train minibatch one forward of all its (sample, timestep) pairs (CFG-doubled) with grad, a
    scalar loss, backward and an AdamW step on the LoRA weights. Scheduler arithmetic, log-probs,
    the reward and advantages are left out: this is what any trainer of this epoch must at least
    spend, so trl's time over it bounds the speed-up any implementation can have over trl.
    """
    import time

    import torch

    torch.set_num_threads(args["threads"])
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    s = SETTINGS
    pipe = StableDiffusionPipeline.from_pretrained(args["pretrained"], safety_checker=None)
    unet, vae, text_encoder, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=s["lora_rank"],
            lora_alpha=s["lora_rank"],
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["learning_rate"])
    cfg = args["guidance_scale"] > 1.0
    B, K, n_batches = s["sample_batch_size"], s["num_steps"], s["num_batches_per_epoch"]
    lat = unet.config.sample_size
    g = torch.Generator().manual_seed(s["seed"])
    timesteps = torch.linspace(999, 0, K).round().long()

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return text_encoder(ids.input_ids)[0]

    rows = []
    for epoch in range(args["num_epochs"]):
        t0 = time.perf_counter()
        with torch.inference_mode():
            embeds = []
            for _ in range(n_batches):
                prompts = [args["prompts"][i % len(args["prompts"])] for i in range(B)]
                e = encode(([""] * B if cfg else []) + prompts)
                x = torch.randn(B, 4, lat, lat, generator=g)
                for t in timesteps:
                    xin = torch.cat([x, x]) if cfg else x
                    eps = unet(xin, t, encoder_hidden_states=e).sample
                    x = x - 0.01 * eps[-B:]
                vae.decode(x / vae.config.scaling_factor)
                embeds.append(e.clone())
        t1 = time.perf_counter()
        n_train = B * n_batches // s["train_batch_size"]
        for i in range(n_train):
            e = embeds[i % n_batches]
            mb = s["train_batch_size"] * (2 if cfg else 1)
            ctx = e[:mb].repeat(K, 1, 1)
            xin = torch.randn(K * mb, 4, lat, lat, generator=g)
            tin = timesteps.repeat_interleave(mb)
            loss = unet(xin, tin, encoder_hidden_states=ctx).sample.square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        n = B * n_batches
        rows.append(
            {
                "epoch": epoch,
                "samples": n,
                "time": t2 - t0,
                "time_sample": t1 - t0,
                "time_train": t2 - t1,
                "samples_per_s": n / (t2 - t0),
            }
        )
    print("LIMIT_RESULT " + json.dumps({"rows": rows}), flush=True)


# ---------------------------------------------------------------------- driver
def run_worker(side: str, payload: dict, log: Path) -> dict:
    """Run one side in a fresh process; return its parsed result (raise with the log tail on failure)."""
    if side in ("flowrl", "limit"):
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--{side}-worker", json.dumps(payload)]
        marker = f"{side.upper()}_RESULT "
    else:
        cmd = [str(TRL_PYTHON), str(REPO / "bench" / "_trl_ddpo_worker.py"), json.dumps(payload)]
        marker = "TRL_RESULT "
    env = dict(os.environ, OMP_NUM_THREADS=str(payload["threads"]), MKL_NUM_THREADS=str(payload["threads"]))
    env.pop("PYTHONPATH", None)  # keep the two venvs apart
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker) :])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
    raise RuntimeError(f"{side} worker failed (exit {proc.returncode}); log {log}:\n{tail}")


def summarize(runs: list[dict]) -> dict:
    """Pooled throughput over all post-warmup epochs of all runs, medians of the time split, and
    the best epoch (the least disturbed by other load on the machine)."""
    rows = [r for run in runs for r in run["rows"][1:]]  # epoch 0 of each run is warmup
    return {
        "epochs": len(rows),
        "pooled": sum(r["samples"] for r in rows) / sum(r["time"] for r in rows),
        "best": max(r["samples_per_s"] for r in rows),
        "worst": min(r["samples_per_s"] for r in rows),
        "sec_epoch": statistics.median(r["time"] for r in rows),
        "sec_sample": statistics.median(r["time_sample"] for r in rows),
        "sec_train": statistics.median(r["time_train"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guidance", type=float, nargs="+", default=[5.0, 1.0], help="CFG scales to compare")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side and CFG (alternating)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warmup")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--workdir",
        default=None,
        help="where the model folder, run folders and logs go (default: a temp dir)",
    )
    ap.add_argument(
        "--max-foreign", type=float, default=0.3, help="repeat a run if other processes used more cores"
    )
    ap.add_argument("--retries", type=int, default=1, help="repeats of a disturbed run")
    ap.add_argument(
        "--quiet-timeout", type=float, default=60.0, help="seconds to wait for a quiet machine per run"
    )
    ap.add_argument("--flowrl-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.flowrl_worker is not None:
        flowrl_worker(json.loads(args.flowrl_worker))
        return
    if args.limit_worker is not None:
        limit_worker(json.loads(args.limit_worker))
        return
    if not TRL_PYTHON.exists():
        sys.exit(f"{TRL_PYTHON} not found: run `bash bench/setup_trl_env.sh` first")
    if args.epochs < 2:
        sys.exit("--epochs must be >= 2 (the first epoch of every run is warmup)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="flowrl_bench_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "tiny_sd"
    if folder.exists():
        shutil.rmtree(folder)
    checksum = prepare_folder(folder)

    results = []
    disturbed = 0.0
    for g in args.guidance:
        runs: dict[str, list[dict]] = {"flowrl": [], "trl": [], "limit": []}
        for r in range(args.rounds):
            order = ("flowrl", "trl", "limit") if r % 2 == 0 else ("limit", "trl", "flowrl")
            for side in order:
                out_dir = work / f"runs_{side}_g{g}_r{r}"
                payload = dict(
                    SETTINGS,
                    pretrained=str(folder),
                    guidance_scale=g,
                    num_epochs=args.epochs,
                    threads=args.threads,
                    prompts=PROMPTS,
                    output_dir=str(out_dir),
                    cfg1_shim=g <= 1.0,
                )
                # other work on the machine skews timings: wait for quiet, measure it during the
                # run, and repeat a run that shared the CPU (at most --retries times)
                for attempt in range(args.retries + 1):
                    wait_for_quiet(timeout_s=args.quiet_timeout)
                    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, never a resume
                    with ForeignCPU() as busy:
                        res = run_worker(side, payload, work / f"log_{side}_g{g}_r{r}.txt")
                    if busy.cores < args.max_foreign:
                        break
                    print(f"  ({side} run shared the CPU with {busy.cores:.2f} cores of other work; ", end="")
                    print("repeating)" if attempt < args.retries else "kept)", flush=True)
                disturbed = max(disturbed, busy.cores)
                if side == "trl":  # the trl side must have loaded the very same weights
                    for name, v in checksum.items():
                        if abs(res["checksum"][name] - v) > 1e-6 * max(1.0, abs(v)):
                            raise RuntimeError(
                                f"trl loaded different {name} weights: {res['checksum'][name]} vs {v}"
                            )
                runs[side].append(res)
                s = summarize([res])
                print(
                    f"  CFG {g}: round {r} {side:6s} {s['pooled']:6.2f} samples/s, epochs "
                    + " ".join(f"{row['samples_per_s']:.2f}" for row in res["rows"][1:])
                    + f" (other processes: {busy.cores:.2f} cores)",
                    flush=True,
                )
        f, t, lim = summarize(runs["flowrl"]), summarize(runs["trl"]), summarize(runs["limit"])
        results.append((g, f, t, lim))
        tp = {runs["flowrl"][0]["trainable_params"], runs["trl"][0]["trainable_params"]}
        if len(tp) != 1:
            print(
                f"  warning: trainable parameter counts differ: flowrl {runs['flowrl'][0]['trainable_params']}, trl {runs['trl'][0]['trainable_params']}"
            )
        trl_versions = runs["trl"][0]["versions"]
        flowrl_versions = runs["flowrl"][0]["versions"]

    s = SETTINGS
    print(
        f"\nDDPO epoch throughput, tiny SD (32x32), {s['num_steps']} DDIM steps eta {s['eta']}, "
        f"{s['sample_batch_size']}x{s['num_batches_per_epoch']} samples/epoch, train batch {s['train_batch_size']}, "
        f"LoRA r{s['lora_rank']}, fp32 CPU x{args.threads} threads; {args.rounds} runs per side x "
        f"{args.epochs - 1} timed epochs (first epoch of each run dropped)"
    )
    print(f"flowrl venv: {flowrl_versions}; trl venv: {trl_versions}\n")
    print(
        "| CFG | flowrl samples/s | trl samples/s | flowrl / trl | best-epoch ratio "
        "| flowrl s/epoch (sample + train) | trl s/epoch (sample + train) |"
    )
    print("|----:|---:|---:|---:|---:|---:|---:|")
    for g, f, t, _ in results:
        mark = " *" if g <= 1.0 else ""
        print(
            f"| {g:.1f}{mark} | {f['pooled']:.2f} | {t['pooled']:.2f} | {f['pooled'] / t['pooled']:.2f} "
            f"| {f['best'] / t['best']:.2f} "
            f"| {f['sec_epoch']:.2f} ({f['sec_sample']:.2f} + {f['sec_train']:.2f}) "
            f"| {t['sec_epoch']:.2f} ({t['sec_sample']:.2f} + {t['sec_train']:.2f}) |"
        )
    print(
        "\nThe networks alone (limit_worker: the same epoch's forwards, decodes, backward and AdamW "
        "steps, no trainer):\n"
    )
    print(
        "| CFG | limit samples/s | limit s/epoch (sample + train) | flowrl / limit (time) | trl / limit (time) = most any trainer can gain over trl |"
    )
    print("|----:|---:|---:|---:|---:|")
    for g, f, t, lim in results:
        print(
            f"| {g:.1f} | {lim['pooled']:.2f} | {lim['sec_epoch']:.2f} ({lim['sec_sample']:.2f} + {lim['sec_train']:.2f}) "
            f"| {lim['pooled'] / f['pooled']:.2f} | {lim['pooled'] / t['pooled']:.2f} |"
        )
    if any(g <= 1.0 for g, *_ in results):
        print(
            "\n* trl at CFG <= 1 needs the _encode_prompt shim in bench/_trl_ddpo_worker.py (see the docstring)."
        )
    print(
        "\nsamples/s: all timed samples / all timed epoch seconds; best-epoch ratio: fastest flowrl epoch / "
        "fastest trl epoch;\ns/epoch: medians; sample = sampling + reward (+ advantages for trl), "
        f"train = PPO update (+ advantages for flowrl).\nlogs and run folders in {work}"
    )
    note = "  WARNING: timings disturbed, rerun on a quiet machine" if disturbed >= args.max_foreign else ""
    print(f"most CPU used by other processes during a kept run: {disturbed:.2f} cores{note}")


if __name__ == "__main__":
    main()

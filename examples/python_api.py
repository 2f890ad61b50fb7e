"""flowrl from Python: sample a chain, score it, compute one DDPO loss by hand, then train.

python examples/python_api.py [--out runs/python_api]     # about 20 s on 2 CPU cores
"""

import argparse
import time

import torch

from flowrl.config import load_config
from flowrl.core import PerPromptStatTracker, policy_loss
from flowrl.models import StableDiffusionAdapter, build_tiny_sd_pipeline
from flowrl.rewards import Reward
from flowrl.run import Run
from flowrl.samplers import DDIMSampler

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="where the training run's folder is written")
    args = parser.parse_args()

    pipe = build_tiny_sd_pipeline()
    adapter = StableDiffusionAdapter(pipe, finetune="lora", lora_rank=4)
    sampler = DDIMSampler(pipe.scheduler.config, num_steps=10, eta=1.0)
    prompts = ["a red square", "a blue square"] * 2
    chain = sampler.sample(adapter, prompts, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    images = adapter.decode(chain.latents[:, -1])
    rewards, _ = Reward([{"name": "jpeg_compressibility"}])(images, prompts)
    advantages = PerPromptStatTracker(min_count=2).update(prompts, rewards)
    k = torch.zeros(len(chain), dtype=torch.long)  # first denoising step of every trajectory
    new = sampler.log_prob(adapter, chain, k)
    terms = policy_loss(new.log_prob, chain.log_probs[:, 0], advantages, clip_range=1e-4)
    terms["loss"].backward()
    print({k: round(v.item(), 6) for k, v in terms.items()})

    overrides = ["train.num_epochs=2", "train.eval_every=0", f"train.output_dir={args.out}"]
    name = f"python_api-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_config("tasks/jpeg_tiny.yaml", overrides + [f"train.run_name={name}"])
    run = Run(cfg, task_name="python_api")
    history = run.train()  # one metrics row per epoch, after row 0 (the evaluation before training)
    print("rewards per epoch:", [round(r["reward_mean"], 4) for r in history if "reward_mean" in r])
    print(f"run folder: {run.run_dir}")

"""trl 0.11.4's DDPOTrainer on a local tiny Stable Diffusion folder: one timed run (worker).

Run by bench/bench_vs_trl.py with the trl venv's Python (/work/main/.venv-trl/bin/python, made by
bench/setup_trl_env.sh), never imported by flowrl. Takes one JSON argument with the settings and
prints one line ``TRL_RESULT {...}`` with the time of every ``trainer.step(epoch, global_step)``
(sampling + reward + advantage + update: one DDPO epoch).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings


def jpeg_compressibility(images, prompts, metadata):
    """Negative JPEG size in kB at quality 95 of (B, 3, H, W) images in [0, 1]; the same formula
    as flowrl's built-in ``jpeg_compressibility`` (flowrl/rewards/jpeg.py)."""
    import numpy as np
    import torch
    from PIL import Image

    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32), {}


def load_text_encoder_weights(pipe, folder: str) -> None:
    """The folder's text encoder was saved by transformers 5, whose CLIPTextModel keys lack the
    ``text_model.`` prefix that transformers 4.46 expects (so from_pretrained left it random).
    Load the saved weights by hand, strictly, so both sides run the very same networks."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
    missing, unexpected = pipe.text_encoder.load_state_dict(state, strict=False)
    # position_ids is a non-persistent buffer in some versions and saved in others
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text encoder weights do not match: missing {missing}, unexpected {unexpected}")


def install_cfg1_shim() -> None:
    """Let trl 0.11.4 sample at guidance_scale <= 1.

    trl's pipeline_step calls ``pipe._encode_prompt(..., do_classifier_free_guidance,
    prompt_embeds=..., negative_prompt_embeds=...)`` and DDPOTrainer always passes negative
    embeddings. Since diffusers 0.22 (needed for ``unet.add_adapter``, trl's LoRA path) that
    deprecated method concatenates [negative, positive] unconditionally, so without CFG the UNet
    gets 2B text embeddings for B latents and fails. This restores the older behaviour trl was
    written against (concatenate only under CFG); it changes no computation otherwise.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    def _encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        **kwargs,
    ):
        pos, neg = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt, **kwargs
        )
        return torch.cat([neg, pos]) if do_classifier_free_guidance else pos

    StableDiffusionPipeline._encode_prompt = _encode_prompt


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(args["threads"])
    warnings.filterwarnings("ignore")
    import random

    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    if args.get("cfg1_shim"):
        install_cfg1_shim()

    pipe = DefaultDDPOStableDiffusionPipeline(args["pretrained"], use_lora=True)  # LoRA r=4 on to_q/k/v/out.0
    load_text_encoder_weights(pipe.sd_pipeline, args["pretrained"])
    checksum = {
        name: float(sum(p.double().sum() for p in getattr(pipe, name).parameters()))
        for name in ("unet", "vae", "text_encoder")
    }

    prompts = args["prompts"]
    rng = random.Random(args["seed"])

    def prompt_fn():
        return rng.choice(prompts), {}

    config = DDPOConfig(
        num_epochs=args["num_epochs"],
        mixed_precision="no",  # fp32 (trl's default is fp16)
        sample_num_steps=args["num_steps"],
        sample_eta=args["eta"],
        sample_guidance_scale=args["guidance_scale"],
        sample_batch_size=args["sample_batch_size"],
        sample_num_batches_per_epoch=args["num_batches_per_epoch"],
        train_batch_size=args["train_batch_size"],
        train_learning_rate=args["learning_rate"],
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=1,
        train_timestep_fraction=1.0,
        # trl doubles the training batch for CFG whenever train_cfg is set, even at guidance 1.0
        # (where the guided output equals the conditional one): match the sampling setting.
        train_cfg=args["guidance_scale"] > 1.0,
        train_clip_range=args["clip_range"],
        train_adv_clip_max=args["adv_clip_max"],
        per_prompt_stat_tracking=True,  # as flowrl's ddpo
        per_prompt_stat_tracking_buffer_size=args["stat_buffer_size"],
        per_prompt_stat_tracking_min_count=args["stat_min_count"],
        async_reward_computation=False,
        save_freq=10**9,  # no checkpoints inside the timed steps
        seed=args["seed"],
        log_with=None,
        project_kwargs={
            "project_dir": args["output_dir"],
            "logging_dir": os.path.join(args["output_dir"], "logs"),
        },
    )
    trainer = DDPOTrainer(config, jpeg_compressibility, prompt_fn, pipe)
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    n_trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)

    # time the update part of each step (wrapping the bound method adds nothing measurable);
    # the rest of the step is sampling + reward + advantages
    train_time = [0.0]
    inner_train = trainer._train_batched_samples

    def timed_train(*a, **kw):
        t = time.perf_counter()
        try:
            return inner_train(*a, **kw)
        finally:
            train_time[0] += time.perf_counter() - t

    trainer._train_batched_samples = timed_train

    rows = []
    global_step = 0
    for epoch in range(config.num_epochs):
        train_time[0] = 0.0
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        dt = time.perf_counter() - t0
        n = config.sample_batch_size * config.sample_num_batches_per_epoch
        rows.append(
            {
                "epoch": epoch,
                "samples": n,
                "time": dt,
                "time_sample": dt - train_time[0],
                "time_train": train_time[0],
                "samples_per_s": n / dt,
                "global_step": global_step,
            }
        )

    import diffusers
    import transformers
    import trl

    print(
        "TRL_RESULT "
        + json.dumps(
            {
                "rows": rows,
                "checksum": checksum,
                "trainable_params": n_trainable,
                "threads": torch.get_num_threads(),
                "versions": {
                    "torch": torch.__version__,
                    "trl": trl.__version__,
                    "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__,
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

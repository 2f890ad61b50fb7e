"""A tiny text-to-image diffusion model of handwritten digits, pre-trained here on a laptop CPU.

The data are scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797
images, 8x8, values 0-16), so nothing is downloaded. The model is Stable Diffusion's design
without the VAE, made of the same diffusers / transformers classes, so flowrl's adapter and
sampler apply unchanged:

    prompt "a handwritten digit 3" -> CLIP tokenizer -> CLIPTextModel (2 layers, width 32)
        -> (B, 77, 32) hidden states -> cross-attention of a UNet2DConditionModel
           (block_out_channels (32, 64), one layer per block, 1 channel, 8x8 pixels)
    DDIMScheduler with Stable Diffusion's settings (steps_offset=1, set_alpha_to_one=False,
    clip_sample=False) and DDPM's linear betas, which suit pixel space (a_T ~ 4e-5: x_T is noise).

Samples live in [-1, 1] (pixel value v in 0..16 is stored as v / 8 - 1); ``adapter.decode`` maps
them to (B, 1, 8, 8) images in [0, 1].

Pre-training (:func:`pretrain_digits_pipeline`) is plain DDPM (Ho et al. 2020, eq. 14):

    loss = || eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, c) ||^2,  t ~ U{0..999}

with the text encoder trained jointly and 10% of prompts replaced by "" (so classifier-free
guidance works too). Everything derives from one seed; the result is cached as a diffusers
``save_pretrained`` folder (safetensors) under ``$FLOWRL_CACHE`` (default ``~/.cache/flowrl``),
written to a temporary folder and renamed.

The module also trains the digit classifier behind the ``digit_alignment`` reward
(:class:`DigitClassifier`, cached the same way), and parses the digit a prompt names.

Shapes: ``B`` batch, ``N`` dataset images, ``L`` = 77 tokens, ``D`` = 32 text width.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

MODEL_NAME = "digits-v1"
CLASSIFIER_NAME = "digits-classifier-v1"
PROMPT_TEMPLATE = "a handwritten digit {}"
NUM_HELDOUT = 297  # images kept out of both the diffusion model's and the classifier's training
PRETRAIN_STEPS = 750
PRETRAIN_BATCH_SIZE = 128
PRETRAIN_LR = 2e-3
UNCOND_PROB = 0.1
TEXT_WIDTH = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ---------------------------------------------------------------------- data and prompts
def digit_prompt(digit: int) -> str:
    """The prompt the model is trained on for ``digit``: ``"a handwritten digit 3"``."""
    return PROMPT_TEMPLATE.format(digit)


def parse_digit(prompt: str) -> int:
    """The one digit a prompt names, as a numeral ("digit 3") or a word ("a three").

    Raises:
        ValueError: when the prompt names no digit, or more than one.
    """
    found = {int(m) for m in re.findall(r"(?<![\d.])\d(?![\d.])", prompt)}
    words = re.findall(r"[a-z]+", prompt.lower())
    found |= {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}
    if len(found) != 1:
        what = "names no digit" if not found else f"names several digits {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} {what}: digit rewards need prompts that name exactly one digit 0-9, "
            f"e.g. {digit_prompt(3)!r}"
        )
    return found.pop()


def digits_dataset(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) float images in [0, 1] and (N,) long labels.

    ``split`` is ``"train"`` (1,500 images), ``"heldout"`` (297, fixed by seed 0, used by neither
    the diffusion model nor the classifier) or ``"all"``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the digits model needs scikit-learn for its bundled data: pip install 'flowrl[quickstart]'"
        ) from e
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.long)  # (N,)
    if split == "all":
        return images, labels
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    if split == "train":
        idx = perm[NUM_HELDOUT:]
    elif split == "heldout":
        idx = perm[:NUM_HELDOUT]
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return images[idx], labels[idx]


def cache_root() -> Path:
    """``$FLOWRL_CACHE``, else ``~/.cache/flowrl``."""
    return Path(os.environ.get("FLOWRL_CACHE") or Path.home() / ".cache" / "flowrl")


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary folder next to ``folder``, then rename it into
    place. If another process got there first, keep theirs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- the diffusion model
def build_digits_pipeline(seed: int = 0):
    """The digits model's pipeline with random weights: a ``StableDiffusionPipeline`` whose
    ``vae`` is None (pixel space), a 1-channel 8x8 UNet and a 2-layer CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from flowrl.models.tiny import tiny_clip_text_encoder, tiny_unet
    from flowrl.models.tokenizer import offline_clip_tokenizer

    unet = tiny_unet(8, 1, TEXT_WIDTH, seed)
    text_encoder = tiny_clip_text_encoder(TEXT_WIDTH, seed + 1, intermediate_size=64)
    # Stable Diffusion's DDIM settings (steps_offset=1, set_alpha_to_one=False keep every DDIM
    # step's std > 0 at eta > 0) with DDPM's linear betas, which leave no signal at t = T.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=offline_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pretrain_digits_pipeline(
    steps: int = PRETRAIN_STEPS,
    batch_size: int = PRETRAIN_BATCH_SIZE,
    learning_rate: float = PRETRAIN_LR,
    seed: int = 0,
    progress: bool = True,
):
    """Train the digits pipeline with the DDPM loss on the training split; returns the pipeline.

    AdamW at ``learning_rate`` with 50 warm-up steps and cosine decay to 0; UNet and text
    encoder train jointly. The 11 distinct prompts (ten digits and "") are encoded once per
    step and gathered per sample, so the text encoder costs almost nothing.
    """
    from tqdm.auto import tqdm

    pipe = build_digits_pipeline(seed)
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    images, labels = digits_dataset("train")
    x_data = images * 2 - 1  # (N, 1, 8, 8) in [-1, 1]
    ids = pipe.tokenizer(
        [digit_prompt(d) for d in range(10)] + [""],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (11, L); row 10 is the unconditional prompt
    alphas_cumprod = scheduler.alphas_cumprod  # (T,)
    T = scheduler.config.num_train_timesteps

    unet.train()
    text_encoder.train()
    # the text encoder trains except its 49,408-row token table (only the prompts' few tokens are used)
    text_encoder.get_input_embeddings().requires_grad_(False)
    params = [p for p in [*unet.parameters(), *text_encoder.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = min(50, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pre-training the digits model", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(x_data), (batch_size,), generator=g)
        x0, y = x_data[idx], labels[idx].clone()  # (B, 1, 8, 8), (B,)
        y[torch.rand(batch_size, generator=g) < UNCOND_PROB] = 10
        t = torch.randint(T, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # q(x_t | x_0), DDPM eq. 4
        embeds = text_encoder(ids)[0][y]  # (11, L, D) -> (B, L, D)
        loss = (unet(x_t, t, encoder_hidden_states=embeds).sample - eps).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return pipe


ASSETS = Path(__file__).resolve().parent / "assets" / "digits"  # shipped with the package


def _embedding_fingerprint(text_encoder) -> float:
    """A checksum of the frozen token table, which the shipped weights leave out (it stays at its
    seeded random init during pre-training; 49,408 x 32 floats that need not be stored)."""
    table = text_encoder.get_input_embeddings().weight.detach().double()
    return float((table * torch.arange(1, table.shape[0] + 1, dtype=torch.float64)[:, None]).sum())


def export_digits_assets(out: str | os.PathLike = ASSETS, progress: bool = True) -> Path:
    """Write the shipped files: ``unet.safetensors``, ``text_encoder.safetensors`` (without the
    token table), ``classifier.safetensors`` and ``info.json``, from the cached pre-trained
    model (pre-training it first if needed). ``python -m flowrl.demo.digits`` runs this."""
    from safetensors.torch import save_file

    pipe = load_digits_pipeline(cache_dir=cache_root(), progress=progress)
    classifier = load_digit_classifier(cache_dir=cache_root())
    info = json.loads((cache_root() / MODEL_NAME / "flowrl_digits.json").read_text())
    info["embedding_fingerprint"] = _embedding_fingerprint(pipe.text_encoder)
    emb = "embeddings.token_embedding.weight"  # the key's suffix (its prefix varies by transformers version)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        contiguous = lambda sd: {k: v.contiguous() for k, v in sd.items() if not k.endswith(emb)}  # noqa: E731
        save_file(contiguous(pipe.unet.state_dict()), str(tmp / "unet.safetensors"))
        save_file(contiguous(pipe.text_encoder.state_dict()), str(tmp / "text_encoder.safetensors"))
        save_file(contiguous(classifier.state_dict()), str(tmp / "classifier.safetensors"))
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    _write_atomically(out, write)
    return out


def _load_shipped_pipeline():
    """The pipeline from the shipped weights, or None if they are absent or do not match this
    torch / transformers (the token table rebuilt from its seed must have the stored checksum)."""
    from safetensors.torch import load_file

    if not (ASSETS / "unet.safetensors").is_file():
        return None
    info = json.loads((ASSETS / "info.json").read_text())
    pipe = build_digits_pipeline(info.get("seed", 0))
    if not math.isclose(
        _embedding_fingerprint(pipe.text_encoder), info["embedding_fingerprint"], rel_tol=1e-9
    ):
        return None
    pipe.unet.load_state_dict(load_file(str(ASSETS / "unet.safetensors")))
    missing, unexpected = pipe.text_encoder.load_state_dict(
        load_file(str(ASSETS / "text_encoder.safetensors")), strict=False
    )
    if unexpected or [k for k in missing if not k.endswith("embeddings.token_embedding.weight")]:
        raise RuntimeError(
            f"shipped digits text encoder does not fit: missing {missing}, unexpected {unexpected}"
        )
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe


def load_digits_pipeline(cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """The pre-trained digits pipeline.

    With no ``cache_dir``: the weights shipped in ``flowrl/demo/assets/digits/`` (written by
    ``python -m flowrl.demo.digits``), so every machine starts from the same model. Otherwise
    (or if those are missing) from ``<cache>/digits-v1/``, pre-training it on first use (about
    4.5 minutes on 2 idle CPU cores) and saving it there atomically.

    Returns a ``StableDiffusionPipeline`` with ``vae=None``; a cached folder loads elsewhere with
    ``StableDiffusionPipeline.from_pretrained(folder, vae=None, safety_checker=None)``.
    """
    from diffusers import StableDiffusionPipeline

    if cache_dir is None:
        pipe = _load_shipped_pipeline()
        if pipe is not None:
            return pipe
    folder = Path(cache_dir or cache_root()) / MODEL_NAME
    if not (folder / "model_index.json").is_file():
        start = time.perf_counter()
        pipe = pretrain_digits_pipeline(progress=progress)
        seconds = time.perf_counter() - start
        info = {
            "steps": PRETRAIN_STEPS,
            "batch_size": PRETRAIN_BATCH_SIZE,
            "learning_rate": PRETRAIN_LR,
            "seed": 0,
            "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(),
        }

        def write(tmp: Path) -> None:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "flowrl_digits.json").write_text(json.dumps(info, indent=2) + "\n")

        _write_atomically(folder, write)
        if progress:
            print(f"flowrl: pre-trained the digits model in {seconds:.0f} s; cached at {folder}")
    return StableDiffusionPipeline.from_pretrained(
        str(folder), vae=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


# ---------------------------------------------------------------------- the classifier
class DigitClassifier(nn.Module):
    """A small MLP on 8x8 digit images: (B, 1, 8, 8) in [0, 1] -> (B, 10) logits.

    64 -> 128 -> ReLU -> 10; differentiable in the images.
    """

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitClassifier takes (B, 1, 8, 8) images, got {tuple(images.shape)}")
        return self.net(images.float())


def train_digit_classifier(seed: int = 0, epochs: int = 60) -> DigitClassifier:
    """Fit :class:`DigitClassifier` on the training split (Adam, minibatches of 64, a few seconds)."""
    images, labels = digits_dataset("train")
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def load_digit_classifier(cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """The classifier shipped in ``flowrl/demo/assets/digits/`` (with no ``cache_dir``), else from
    ``<cache>/digits-classifier-v1/model.safetensors``, trained and saved atomically on first use."""
    from safetensors.torch import load_file, save_file

    weights = ASSETS / "classifier.safetensors"
    if cache_dir is not None or not weights.is_file():
        weights = Path(cache_dir or cache_root()) / CLASSIFIER_NAME / "model.safetensors"
        if not weights.is_file():
            model = train_digit_classifier()
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            _write_atomically(
                weights.parent, lambda tmp: (tmp.mkdir(), save_file(state, str(tmp / weights.name)))
            )
    model = DigitClassifier()
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="pre-train the digits model and classifier (or take them from the cache) and "
        "write the files flowrl ships in flowrl/demo/assets/digits/"
    )
    parser.add_argument("--out", default=str(ASSETS))
    print(f"wrote {export_digits_assets(parser.parse_args().out)}")

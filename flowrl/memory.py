"""Order-of-magnitude estimates of a command's peak memory from its config alone, checked before
any weights load (issue 18): a size that cannot fit is one clear line up front, naming the term
that dominates and the option that shrinks it, instead of the allocator's traceback (or the
machine's swap) minutes later.

    P   parameters (the denoiser's; the text encoders' and the VAE's), read from a model folder's
        config and weight-file headers (safetensors headers hold every tensor's shape: no weights read)
    B   trajectories stored per epoch: sample_batch_size x num_batches_per_epoch (env: num_envs x n_steps)
    K   denoising steps;  E  elements of one sample (latent C x h x w; env: an action chunk Ta x Da)
    G   2 with classifier-free guidance (the conditional and unconditional halves of one forward), else 1
    R   rows of one training forward: minibatch_size x steps per forward (train.timestep_batch) x G
    A   activation elements one row's forward keeps for the backward

    weights     P_denoiser x its bytes (float32 when it trains in full) + the others x the weight dtype,
                + a frozen copy of the denoiser for a full fine-tune with a KL reference
    optimizer   trained parameters x 12 bytes (float32 gradient and AdamW's two moments); LoRA: its adapters
    chain       B x (K + 1) x E x 4 bytes, + B x the stored text embeddings x G, + the decoded images
    training    R x A x (2 bytes under fp16 / bf16, else 4); reward backprop: the re-run steps' and the
                decoder's activations with gradient
    sampling    sample_batch_size x G x A_0 x activation bytes, A_0 what one forward holds without gradient
    env tasks   the stored chunk chains (B x ((K + 1) E + the observation history) x 4 bytes, x 2 for the
                epoch's copies), ~1 MiB per environment (num_envs; evaluation: one per episode)

A is a sum over the network's blocks of their feature maps, times :data:`ALPHA`: a UNet block of c
channels at side s counts c s^2 (a resnet) or 3 c s^2 (a transformer block), a transformer layer
3 T D (tokens x width). ALPHA was fitted on the tiny UNet ((32, 64) channels, 16 and 32 latent
sides: autograd saved 1.25x what ALPHA = 8 predicted) by counting the tensors autograd saves;
``tests/test_memory.py`` measures it again there and at other widths and depths (within a factor
of 2). It was not measured on full-size models, whose attention blocks are wider. With gradient
checkpointing (and for A_0) a block keeps only its input, plus one block's full activations at a
time. Everything is on the run's device; it is compared with what that device has free
(``torch.cuda.mem_get_info``; on the CPU the smaller of /proc/meminfo's MemAvailable and the
cgroup's limit minus its usage).

This is an order-of-magnitude estimate (attention kernels, allocator caching, a reward model's own
memory and the framework's overhead are not counted): a run estimated above
:data:`REFUSE_FACTOR` x the available memory is refused (it cannot fit even if the estimate is
several times too high); above 1 x it is a warning. ``train.skip_memory_check=true`` (``flowrl
sample --skip-memory-check``) turns the check off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flowrl.errors import FlowrlError

ALPHA = 10.0  # activation elements saved per feature-map element of a block (fitted on the tiny UNet)
ENV_BYTES = 1024**2  # one gymnasium MuJoCo env (measured: InvertedPendulum-v5 0.55 MiB, Hopper-v5 1.0 MiB)
REFUSE_FACTOR = 4.0  # refuse above this multiple of the available memory


class MemoryEstimateError(FlowrlError, MemoryError):
    """The estimated peak memory exceeds what the device has by a clear factor."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


# ---------------------------------------------------------------------- what a model is made of
@dataclass
class Blocks:
    """A network's blocks as (feature-map elements per row, weight): 1 a resnet, 3 an attention block."""

    blocks: list[tuple[float, float]] = field(default_factory=list)

    def saved(self, checkpointing: bool = False) -> float:
        """A: activation elements a forward with gradient keeps per row."""
        if not self.blocks:
            return 0.0
        if checkpointing:
            return sum(n for n, _ in self.blocks) + ALPHA * max(n * w for n, w in self.blocks)
        return ALPHA * sum(n * w for n, w in self.blocks)

    def transient(self) -> float:
        """A_0: what a forward without gradient holds per row (skip connections and one block)."""
        return self.saved(checkpointing=True)


def unet_blocks(config: dict, side: int | None = None) -> Blocks:
    """A diffusers UNet2DConditionModel's blocks at latent side ``side`` (default its sample_size)."""
    side = side or _side(config.get("sample_size", 64))
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = config.get("layers_per_block", 2)
    layers = layers if isinstance(layers, int) else max(layers)
    down = config.get("down_block_types") or ["CrossAttnDownBlock2D"] * len(channels)
    per_attn = config.get("transformer_layers_per_block", 1)
    per_attn = per_attn if isinstance(per_attn, int) else max(per_attn)
    out = Blocks()
    for i, c in enumerate(channels):
        s2 = (side / 2**i) ** 2
        attn = "Attn" in str(down[i]) if i < len(down) else True
        for _ in range(2 * layers + 1):  # down: layers resnets; up: layers + 1
            out.blocks.append((c * s2, 1.0))
            if attn:
                out.blocks.append((c * s2, 3.0 * per_attn))
    c, s2 = channels[-1], (side / 2 ** (len(channels) - 1)) ** 2  # the mid block
    out.blocks += [(c * s2, 1.0), (c * s2, 3.0 * per_attn), (c * s2, 1.0)]
    return out


def transformer_blocks(config: dict, side: int | None = None, text_tokens: int = 0) -> Blocks:
    """A diffusion transformer's (SD3's, Flux's) layers: 3 x tokens x width each."""
    side = side or _side(config.get("sample_size", 128))
    patch = config.get("patch_size", 1 if "num_single_layers" in config else 2)
    tokens = (side / patch) ** 2 + text_tokens
    width = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 64)
    layers = config.get("num_layers", 24) + config.get("num_single_layers", 0)
    return Blocks([(tokens * width, 3.0)] * layers)


def vae_decoder_blocks(config: dict, latent_side: int) -> Blocks:
    """An AutoencoderKL decoder's blocks from the latent side up to the image."""
    channels = list(config.get("block_out_channels", (128, 256, 512, 512)))[::-1]
    layers = config.get("layers_per_block", 2) + 1
    out = Blocks([(channels[0] * latent_side**2, 1.0), (channels[0] * latent_side**2, 3.0)])
    for i, c in enumerate(channels):
        out.blocks += [(c * (latent_side * 2**i) ** 2, 1.0)] * layers
    return out


def _side(v) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


@dataclass
class ModelSizes:
    """What the estimate needs of a text-to-image model, read without loading it."""

    denoiser_params: float  # P of the trained network
    other_params: float  # text encoders, VAE
    text_params: float  # the text encoders alone (TexForce trains them)
    lora_params_per_rank: float  # LoRA parameters at rank 1 on the family's target modules
    latent: tuple[int, ...]  # (C, h, w) of one sample
    image_side: int
    cond_elements: float  # stored text embeddings of one prompt (L x D over the encoders)
    denoiser: Blocks
    decoder: Blocks | None  # the VAE decoder (None: a pixel-space model)
    source: str  # where the sizes were read
    image_hw: tuple[int, int] | None = None  # (H, W) when not image_side x image_side (model.resolution)

    @property
    def pixels(self) -> int:
        return self.image_hw[0] * self.image_hw[1] if self.image_hw else self.image_side**2

    def describe(self) -> str:
        h, w = self.image_hw or (self.image_side, self.image_side)
        return f"{h}x{w} images ({'x'.join(map(str, self.latent))} latents)"

    def at_resolution(self, resolution) -> ModelSizes:
        """The sizes at ``model.resolution`` (an int, or [H, W] pixels): every feature map, token count
        and latent scales with the image's area (the text tokens do not; they are few)."""
        if resolution is None:
            return self
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        ratio = h * w / self.image_side**2
        scale = lambda b: Blocks([(n * ratio, k) for n, k in b.blocks])  # noqa: E731
        c, lh, lw = self.latent
        latent = (c, max(1, round(lh * h / self.image_side)), max(1, round(lw * w / self.image_side)))
        return dataclasses.replace(
            self,
            latent=latent,
            denoiser=scale(self.denoiser),
            decoder=scale(self.decoder) if self.decoder is not None else None,
            image_hw=(h, w),
        )


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _header(path: Path) -> dict:
    """A safetensors file's header: {name: {"shape": [...], "dtype": ...}} (8 + n bytes read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024**2:
            raise ValueError("header too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _folder_params(folder: Path) -> tuple[float, float]:
    """(parameters, LoRA parameters per rank) of one component folder, from its weight files."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]  # not a .fp16.safetensors variant
    params, lora = 0.0, 0.0
    for f in plain or files[:1]:
        try:
            for name, t in _header(f).items():
                shape = t.get("shape", [])
                params += math.prod(shape)
                if len(shape) == 2 and any(name.endswith(f"{m}.weight") for m in LORA_TARGETS):
                    lora += shape[0] + shape[1]
        except (OSError, ValueError, KeyError, struct.error):
            params += f.stat().st_size / 2  # unreadable header: count the file as fp16 weights
    if not files:  # .bin weights: their size, as float32
        params = sum(f.stat().st_size for f in folder.glob("*.bin")) / 4
    return params, lora


def read_model_sizes(pretrained: str, tiny_image_size: int = 32) -> ModelSizes | None:
    """The sizes of ``model.pretrained`` (tiny, digits, a local pipeline folder, or a hub id already
    in the local cache); None when they cannot be read without downloading."""
    if pretrained == "tiny":  # flowrl.models.tiny: a (32, 64)-channel UNet, latents half the image
        side = tiny_image_size // 2
        config = {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        }
        decoder = vae_decoder_blocks({"block_out_channels": (32, 64), "layers_per_block": 1}, side)
        return ModelSizes(
            1.0e6,
            2.3e6,
            1.6e6,
            2e3,
            (4, side, side),
            tiny_image_size,
            77 * 32,
            unet_blocks(config, side),
            decoder,
            "the tiny model",
        )
    if pretrained == "digits":  # flowrl.demo.digits: a pixel-space 1-channel 8x8 UNet
        config = {"block_out_channels": (32, 64), "layers_per_block": 1}
        return ModelSizes(
            1.0e6, 1.6e6, 1.6e6, 2e3, (1, 8, 8), 8, 77 * 32, unet_blocks(config, 8), None, "the digits model"
        )
    folder = Path(pretrained).expanduser()
    if not (folder / "model_index.json").is_file():
        folder = _cached_hub_folder(pretrained)
        if folder is None:
            return None
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the family check reports a broken index
    if not isinstance(index, dict):
        return None
    configs: dict[str, dict] = {}
    for name in index:
        path = folder / name / "config.json"
        if not name.startswith("_") and path.is_file():
            try:
                configs[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    den_name = "unet" if "unet" in configs else "transformer" if "transformer" in configs else None
    if den_name is None:
        return None
    den = configs[den_name]
    vae = configs.get("vae")
    scale = 2 ** (len(vae.get("block_out_channels", (1,) * 4)) - 1) if vae else 1
    side = _side(den.get("sample_size", 64))
    patch = den.get("patch_size") if den_name == "transformer" else None
    channels = den.get("in_channels", 4)
    if den_name == "transformer" and "num_single_layers" in den:  # Flux: 2x2-packed latents
        channels, patch = channels // 4, 2  # in_channels counts a packed 2x2 patch's
    params = {n: _folder_params(folder / n) for n in configs if n != "scheduler"}
    text = [n for n in configs if n.startswith("text_encoder")]
    cond = 0.0
    for n in text:
        c = configs[n]
        length = c.get("max_position_embeddings", 77) if "clip" in str(c.get("model_type", "clip")) else 256
        cond += length * c.get("hidden_size", c.get("d_model", 768))
    text_tokens = sum(256 for n in text if "clip" not in str(configs[n].get("model_type", "clip")))
    blocks = (
        unet_blocks(den, side)
        if den_name == "unet"
        else transformer_blocks({**den, "patch_size": patch or 2}, side, text_tokens)
    )
    return ModelSizes(
        denoiser_params=params.get(den_name, (0.0, 0.0))[0],
        other_params=sum(p for n, (p, _) in params.items() if n != den_name),
        text_params=sum(params[n][0] for n in text if n in params),
        lora_params_per_rank=params.get(den_name, (0.0, 0.0))[1],
        latent=(channels, side, side),
        image_side=side * scale,
        cond_elements=cond,
        denoiser=blocks,
        decoder=vae_decoder_blocks(vae, side) if vae else None,
        source=f"{folder}",
    )


def _cached_hub_folder(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "model_index.json")
    except Exception:  # not a repo id, no huggingface_hub
        return None
    return Path(hit).parent if isinstance(hit, str) else None


# ---------------------------------------------------------------------- the estimate
@dataclass
class Term:
    name: str  # what it is, with its sizes
    bytes: float
    fix: str  # the option that shrinks it


@dataclass
class Estimate:
    terms: list[Term]
    device: str

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def dominant(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


def _dtype_bytes(precision: str) -> int:
    return 2 if precision in ("fp16", "bf16") else 4


def _uses_cfg(family: str, guidance_scale: float | None) -> int:
    return 2 if (guidance_scale or 1) > 1 and family != "lcm" else 1


def estimate_text_to_image(cfg, family: str, sizes: ModelSizes) -> Estimate:
    """The peak of a text-to-image training run: the terms of the module docstring."""
    t, m, s, a = cfg.train, cfg.model, cfg.sampler, cfg.algorithm
    wbytes = abytes = _dtype_bytes(t.mixed_precision)
    G = _uses_cfg(family, s.guidance_scale)
    B = t.sample_batch_size * t.num_batches_per_epoch
    K = s.num_steps
    E = math.prod(sizes.latent)
    res = sizes.describe()
    size_fix = (
        "lower model.resolution"
        if getattr(m, "resolution", None) is not None
        else "lower model.tiny_image_size"
        if m.pretrained == "tiny"
        else "use a model of a smaller resolution (or set model.resolution)"
    )
    full = m.finetune == "full"
    trained = (
        sizes.denoiser_params
        if full
        else sizes.lora_params_per_rank * m.lora_rank
        if m.finetune == "lora"
        else 0
    )
    if m.text_encoder_finetune == "full":
        trained += sizes.text_params
    keep_reference = full and cfg.method.objective_class().keeps_reference(cfg)  # as flowrl.run.Run asks
    weights = sizes.denoiser_params * (4 if full else wbytes) + sizes.other_params * wbytes
    weights += sizes.denoiser_params * wbytes * keep_reference
    terms = [
        Term(
            f"weights ({sizes.denoiser_params + sizes.other_params:.3g} parameters)",
            weights,
            "set train.mixed_precision=bf16" + (" or model.finetune=lora" if full else ""),
        ),
        Term(
            f"optimizer state ({trained:.3g} trained parameters)",
            trained * 12,
            "set model.finetune=lora" if full else "lower model.lora_rank",
        ),
        Term(
            f"the stored chain ({B} trajectories x {K + 1} states of {res})",
            B * ((K + 1) * E + sizes.cond_elements * G + 3 * sizes.pixels) * 4,
            "lower train.sample_batch_size or train.num_batches_per_epoch (or sampler.num_steps)"
            + f", or {size_fix}",
        ),
        Term(
            f"sampling activations ({t.sample_batch_size} samples x {G} (CFG) of {res})",
            t.sample_batch_size * G * sizes.denoiser.transient() * abytes,
            f"lower train.sample_batch_size, or {size_fix}",
        ),
    ]
    ckpt = t.gradient_checkpointing
    if cfg.method.objective == "reward_backprop":
        o = a.options
        steps = 1 if o.mode in ("refl", "draft_lv") else (o.backprop_steps or K)
        rows = t.minibatch_size * G
        per_row = (
            sizes.denoiser.saved(True) + steps * E
            if o.grad_checkpointing
            else steps * sizes.denoiser.saved(ckpt)
        )
        act = rows * per_row * abytes
        if sizes.decoder is not None:  # the decoder runs with gradient on the re-run samples
            act += t.minibatch_size * sizes.decoder.saved(False) * abytes * getattr(o, "lv_samples", 1)
        terms.append(
            Term(
                f"reward-backprop activations ({t.minibatch_size} samples x {G} (CFG) x {steps} steps and the "
                f"decoder, {res})",
                act,
                f"lower train.minibatch_size or algorithm.backprop_steps, or {size_fix}",
            )
        )
    else:
        per_forward = t.timestep_batch or K
        rows = t.minibatch_size * (1 if t.minibatch_unit == "pair" else per_forward) * G
        terms.append(
            Term(
                f"training activations ({rows} rows per forward: train.minibatch_size {t.minibatch_size}"
                f" x {1 if t.minibatch_unit == 'pair' else per_forward} steps x {G} (CFG), {res})",
                rows * sizes.denoiser.saved(ckpt) * abytes,
                "lower train.minibatch_size"
                + (", set train.timestep_batch=1" if per_forward > 1 else "")
                + ("" if ckpt else ", or set train.gradient_checkpointing=true")
                + f", or {size_fix}",
            )
        )
    return Estimate(terms, "")


def estimate_sample(
    num_images: int,
    particles: int,
    num_steps: int,
    guidance_scale: float,
    family: str,
    sizes: ModelSizes,
    tiny: bool,
    gradient: bool,
) -> Estimate:
    """``flowrl sample``: every image of the command in one chain (x particles for best-of-N and SMC)."""
    G = _uses_cfg(family, guidance_scale)
    rows = num_images * particles
    E = math.prod(sizes.latent)
    res = sizes.describe()
    size_fix = "lower --tiny-image-size" if tiny else "use a model of a smaller resolution"
    act = rows * G * (sizes.denoiser.saved(False) if gradient else sizes.denoiser.transient()) * 4
    if gradient and sizes.decoder is not None:
        act += rows * sizes.decoder.saved(False) * 4
    return Estimate(
        [
            Term(
                f"weights ({sizes.denoiser_params + sizes.other_params:.3g} parameters)",
                (sizes.denoiser_params + sizes.other_params) * 4,
                "use a smaller model",
            ),
            Term(
                f"the chain ({rows} samples x {num_steps + 1} states of {res})",
                rows * ((num_steps + 1) * E + sizes.cond_elements * G + 3 * sizes.pixels) * 4,
                f"lower -n/--num-per-prompt, the prompts, --particles or --num-steps, or {size_fix}",
            ),
            Term(
                f"activations ({rows} samples x {G} (CFG) per forward{', with gradient' if gradient else ''}, {res})",
                act,
                f"lower -n/--num-per-prompt, the prompts or --particles, or {size_fix}",
            ),
        ],
        "",
    )


def estimate_env(
    cfg, obs_dim: int, action_dim: int, episodes: int | None = None, particles: int = 1
) -> Estimate:
    """An environment task: the stored chunk chains dominate (policies are small MLPs)."""
    e, m, s = cfg.env, cfg.model, cfg.sampler
    K = s.num_steps
    E = m.action_horizon * action_dim
    chunk = ((K + 1) * E + e.obs_horizon * obs_dim + 8) * 4
    widths = [obs_dim * e.obs_horizon + E, *m.hidden_dims, E]
    params = sum(a * b for a, b in zip(widths, widths[1:]))
    if episodes is None:
        B = e.num_envs * e.n_steps
        terms = [
            Term(
                f"the stored chain ({e.num_envs} envs x {e.n_steps} chunk steps x {K + 1} states)",
                B * chunk * 2,
                "lower env.num_envs or env.n_steps",
            ),  # x 2: the epoch's tensors and their copies
            Term(
                f"training activations ({cfg.train.minibatch_size} rows)",
                cfg.train.minibatch_size * K * sum(m.hidden_dims) * 4 * 4,
                "lower train.minibatch_size",
            ),
        ]
    else:
        rows = episodes * particles
        terms = [
            Term(
                f"evaluation chains ({episodes} episodes x {particles} particles x {K + 1} states)",
                rows * chunk * 4,
                "lower --episodes or --particles",
            )
        ]
    n_envs = e.num_envs if episodes is None else episodes  # evaluation: one env per episode, all at once
    terms.append(
        Term(
            f"{n_envs} environments (~1 MiB each)",
            n_envs * ENV_BYTES,
            "lower env.num_envs" if episodes is None else "lower --episodes",
        )
    )
    terms.append(Term(f"policy weights ({params:.3g} parameters)", params * 16, "lower model.hidden_dims"))
    return Estimate(terms, "")


# ---------------------------------------------------------------------- what is available
def available_memory(device: str) -> tuple[float | None, str]:
    """(free bytes, what they are) on ``device`` ("cuda", "cuda:N" or "cpu"); None if unknown."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return float(free), f"free on cuda:{index}"
    free = None
    try:
        import psutil

        free = float(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = float(line.split()[1]) * 1024
        except OSError:
            pass
    try:  # a container's own limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = float(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free if free is not None else math.inf, float(limit) - used)
    except (OSError, ValueError):
        pass
    return free, "available CPU memory"


def check(
    estimate: Estimate, device: str, skip_option: str, available: float | None = None, what: str = "run"
) -> None:
    """Refuse (MemoryEstimateError) an estimate above REFUSE_FACTOR x the available memory, naming
    the dominant term and its fix; warn above 1 x. ``available`` overrides the reading (tests)."""
    where = "CPU" if device == "cpu" else device
    if available is None:
        available, _ = available_memory(device)
    if available is None or available <= 0:
        return
    total, top = estimate.total, estimate.dominant
    ratio = total / available
    what = (
        f"{what} needs about {human(total)} of {where} memory (an order-of-magnitude estimate), {ratio:.3g}x the "
        f"{human(available)} available; the largest part is {top.name}: {human(top.bytes)}"
    )
    if ratio > REFUSE_FACTOR:
        raise MemoryEstimateError(f"this {what}; {top.fix} (or set {skip_option} to try anyway)")
    if ratio > 1:
        print(f"flowrl: warning: this {what}; it may run out of memory: {top.fix}", file=sys.stderr)


def device_of(setting: str | None) -> str:
    """The device a command will use: ``train.device`` / ``--device`` (auto: cuda when visible)."""
    import torch

    if setting in (None, "auto", "cuda") and torch.cuda.is_available():
        rank = os.environ.get("LOCAL_RANK")  # torchrun / accelerate: this process's GPU
        return f"cuda:{rank}" if rank is not None and rank.isdigit() else "cuda"
    if setting in (None, "auto"):
        return "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"  # the command reports that itself
    return setting


def check_run(cfg, task_name: str = "task") -> None:
    """The check of ``flowrl train`` (and :class:`flowrl.run.Run`), before any weights load."""
    if getattr(cfg.train, "skip_memory_check", False):
        return
    device = device_of(cfg.train.device)
    if cfg.kind == "env":
        dims = _policy_dims(cfg, task_name)
        if dims is None:
            return
        est = estimate_env(cfg, *dims)
    else:
        from flowrl.models import detect_family

        sizes = read_model_sizes(cfg.model.pretrained, cfg.model.tiny_image_size)
        if sizes is not None and cfg.model.pretrained != "digits":
            sizes = sizes.at_resolution(getattr(cfg.model, "resolution", None))
        if sizes is None:
            return
        est = estimate_text_to_image(cfg, detect_family(cfg.model.pretrained, cfg.model.family), sizes)
    check(est, device, "train.skip_memory_check=true")


def _policy_dims(cfg, task_name: str) -> tuple[int, int] | None:
    """(obs_dim, action_dim) from the policy folder's policy.json, without loading the policy."""
    folder = Path(cfg.model.pretrained).expanduser() if cfg.model.pretrained else cfg.bc_dir(task_name)
    try:
        meta = json.loads((folder / "policy.json").read_text(encoding="utf-8"))
        return int(meta["obs_dim"]), int(meta["action_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

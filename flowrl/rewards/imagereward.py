"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", arXiv 2304.05977; reference code ``THUDM/ImageReward``:
``ImageReward/ImageReward.py``, ``ImageReward/models/BLIP``).

A BLIP ViT encodes the image; BLIP's BERT encodes the prompt with cross-attention to the image's
patch embeddings in every layer; the prompt's [CLS] feature goes through an MLP
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts 0.2, 0.2, 0.1, no activations) and the score is
normalised by the reference's constants:

    score = (mlp(h_cls) - 0.16717362830052426) / 1.0333394966054072

Built here on transformers' ``BlipVisionModel`` and ``BlipTextModel``. Weights: the official
``ImageReward.pt`` state dict and its ``med_config.json`` (the text encoder's BERT config), in a
local folder, as files, or fetched from the hub (``THUDM/ImageReward``) on a user's machine; the
reference's keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) are mapped
to the transformers modules (:func:`convert_reference_state_dict`). The ViT's size is read from
the weights (BLIP's ViTs have 64-dim heads: ViT-L 1024 / 16). Preprocessing as the reference's:
bicubic resize of the short side to 224 px (antialiased, as PIL's), center crop, CLIP mean/std;
the prompt through the BERT tokenizer (``bert-base-uncased`` with BLIP's added ``[DEC]`` and
``[ENC]``), padded to 35 tokens. Differentiable in the images, as ReFL uses it (``score_gard``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowrl.errors import InputError, MissingFileError, one_line, read_json
from flowrl.rewards import register_reward
from flowrl.rewards.aesthetic import AestheticMLP

# the reference's normalisation of the MLP's output (ImageReward.__init__)
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35  # the reference pads and truncates the prompt to 35 tokens
VIT_HEAD_DIM = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
VIT_LAYER_NORM_EPS = 1e-6  # timm's ViT in BLIP: partial(nn.LayerNorm, eps=1e-6)
# reference keys the score does not use: BLIP's contrastive projections and the text position ids
UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")
CHECKPOINT_NAMES = ("ImageReward.safetensors", "ImageReward.pt")


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BLIP BERT + the MLP head; ``forward`` returns (B,) scores."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # the same five Linear layers and dropouts

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, Dv)
        # is_decoder=False: bidirectional self-attention (BLIP's mode="multimodal" encoder); the
        # reference's all-ones image attention mask is no mask
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=False,
        ).last_hidden_state  # (B, L, Dt)
        score = self.mlp(text[:, 0].float()).squeeze(-1)  # the [CLS] token's feature
        return (score - SCORE_MEAN) / SCORE_STD


def configs_from_reference(state: dict[str, Tensor], med_config: dict):
    """(BlipVisionConfig, BlipTextConfig) for a reference state dict and its ``med_config.json``:
    the ViT's width, patch, image size, depth and MLP width from the weights' shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v = "blip.visual_encoder."
    try:
        pos = state[v + "pos_embed"]  # (1, 1 + N, D)
        patch = state[v + "patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(v + "blocks."))
        intermediate = state[v + "blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise InputError(
            f"not an ImageReward checkpoint: no BLIP vision encoder weights ({type(e).__name__}: {e}); "
            "give the official ImageReward.pt (keys blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)"
        ) from None
    width, grid = pos.shape[-1], math.isqrt(pos.shape[1] - 1)
    if width % VIT_HEAD_DIM or grid * grid != pos.shape[1] - 1:
        raise InputError(
            f"ImageReward checkpoint's vision encoder has width {width} and {pos.shape[1] - 1} patches: "
            f"BLIP's ViTs have {VIT_HEAD_DIM}-dim heads and a square patch grid; use the official weights"
        )
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )
    missing = [
        k
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        if k not in med_config
    ]
    if missing:
        raise InputError(f"med_config.json lacks {missing}: give BLIP's med_config.json (a BERT config)")
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        intermediate_size=med_config["intermediate_size"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        max_position_embeddings=med_config.get("max_position_embeddings", 512),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=width,  # BLIP_Pretrain sets encoder_width to the ViT's width
        is_decoder=True,  # builds the cross-attention layers; forward runs as an encoder
        bos_token_id=None,  # generation ids, unused by the encoder (BlipTextConfig's assume BERT's vocabulary)
        eos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


def convert_reference_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The reference's ``ImageReward`` keys renamed to :class:`ImageRewardModel`'s: timm's ViT
    (``blocks.i.attn.qkv``) to ``BlipVisionModel`` (``encoder.layers.i.self_attn.qkv``), BLIP's
    med.py BERT to ``BlipTextModel`` (the same names), ``mlp.layers`` as is; unused keys dropped."""
    vit = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj": "embeddings.patch_embedding",
        "norm": "post_layernorm",
    }
    block = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in state.items():
        if UNUSED_KEYS.search(key):
            continue
        new = key
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder.") :]
            name, _, param = rest.rpartition(".")
            if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
                name = f"encoder.layers.{m[1]}.{block.get(m[2], m[2])}"
            else:
                name = vit.get(name, name)
            new = f"vision_model.{name}.{param}" if name else f"vision_model.{vit.get(param, param)}"
        elif key.startswith("blip.text_encoder."):
            new = "text_encoder." + key[len("blip.text_encoder.") :]
        out[new] = value
    return out


def _load_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from flowrl.errors import load_weights

        return load_weights(path, "ImageReward weights")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # not a zip / pickle of tensors: corrupt, truncated, or arbitrary objects
        raise InputError(
            f"ImageReward weights {path} cannot be read as a state dict ({type(e).__name__}: {one_line(e)}); "
            "give the official ImageReward.pt or a safetensors conversion"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InputError(f"ImageReward weights {path} hold {type(state).__name__}, not a state dict")
    return state


def _files(model: str, med_config: str | None) -> tuple[Path, Path, Path | None]:
    """(weights file, med_config.json, folder with a tokenizer or None) for a folder, a weights
    file, or a hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        weights = next((path / n for n in CHECKPOINT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise MissingFileError(
                f"ImageReward folder {path} holds neither of {', '.join(CHECKPOINT_NAMES)}; download "
                "ImageReward.pt and med_config.json from THUDM/ImageReward into it"
            )
        folder = path
    elif path.is_file():
        weights, folder = path, path.parent
    elif model.count("/") == 1 and not model.startswith((".", "/", "~")) and not path.suffix:
        from huggingface_hub import hf_hub_download

        try:
            weights = Path(hf_hub_download(model, "ImageReward.pt"))
            med = (
                Path(med_config).expanduser()
                if med_config
                else Path(hf_hub_download(model, "med_config.json"))
            )
        except Exception as e:  # offline, no such repo, no such file
            raise MissingFileError(
                f"ImageReward: cannot fetch {model!r} from the hub ({type(e).__name__}: {one_line(e)}); "
                "download ImageReward.pt and med_config.json and give their folder as model"
            ) from None
        return weights, med, None
    else:
        raise MissingFileError(
            f"ImageReward model {model!r} not found: give a folder holding ImageReward.pt and med_config.json, "
            "the weights file, or a hub id (THUDM/ImageReward)"
        )
    med = Path(med_config).expanduser() if med_config else folder / "med_config.json"
    if not med.is_file():
        raise MissingFileError(
            f"ImageReward's med_config.json not found at {med}; download it from THUDM/ImageReward "
            "next to the weights, or give its path as med_config"
        )
    has_tokenizer = any((folder / n).is_file() for n in ("vocab.txt", "tokenizer.json"))
    return weights, med, folder if has_tokenizer else None


def load_tokenizer(name: str | Path):
    """BLIP's tokenizer (``init_tokenizer``): BERT's, with ``[DEC]`` as bos and ``[ENC]`` added."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(name))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(
    model: str = "THUDM/ImageReward", med_config: str | None = None, tokenizer: str | None = None
) -> tuple[ImageRewardModel, object]:
    """(model in eval mode, frozen, on the CPU; tokenizer) from a folder, a weights file or a hub
    id. ``tokenizer``: a BERT tokenizer folder or hub id (default: the model folder's, else
    ``bert-base-uncased``)."""
    weights, med, tok_folder = _files(model, med_config)
    state = _load_state(weights)
    vision_config, text_config = configs_from_reference(state, read_json(med, "ImageReward med_config.json"))
    net = ImageRewardModel(vision_config, text_config)
    result = net.load_state_dict(convert_reference_state_dict(state), strict=False)
    # BlipTextEmbeddings' position_ids buffer is not persistent: never in a state dict
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise InputError(
            f"ImageReward weights {weights} do not fit the model from {med}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; give the official ImageReward.pt and its med_config.json"
        )
    tok = load_tokenizer(tokenizer or tok_folder or "bert-base-uncased")
    if len(tok) > text_config.vocab_size:
        raise InputError(
            f"ImageReward tokenizer has {len(tok)} tokens, the text encoder {text_config.vocab_size}; "
            "give BLIP's BERT tokenizer (bert-base-uncased)"
        )
    return net.eval().requires_grad_(False), tok


def preprocess(images: Tensor, size: int) -> Tensor:
    """The reference's transform on (B, 3, H, W) images in [0, 1], differentiable: torchvision's
    ``Resize(size, bicubic)`` of the short side (antialiased), ``CenterCrop(size)``, CLIP's
    ``Normalize``."""
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    images = images[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


@register_reward("imagereward", differentiable=True)
def imagereward(
    model: str = "THUDM/ImageReward",
    med_config: str | None = None,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
):
    """``model``: a folder with ``ImageReward.pt`` (or ``ImageReward.safetensors``) and
    ``med_config.json``, the weights file itself, or a hub id; ``med_config``: its path when not
    beside the weights; ``tokenizer``: a BERT tokenizer folder or hub id."""
    net, tok = load_imagereward(model, med_config, tokenizer)
    net = net.to(device)
    size = net.vision_model.config.image_size

    def reward_fn(images, prompts, metadata):
        ids = tok(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        pixels = preprocess(images.to(device).float(), size)
        return net(pixels, ids["input_ids"].to(device), ids["attention_mask"].to(device)), {}

    return reward_fn

"""ImageReward on a tiny random BLIP: the score against the reference's forward written out here
from its own key names (timm's ViT, BLIP's med.py BERT, the MLP, the normalisation), the
reference-named checkpoint loaded back through the key mapping, the preprocessing against
torchvision's transform, gradients to the images, and bad files."""

import json

import pytest
import torch
import torch.nn.functional as F

from flowrl.errors import InputError, MissingFileError
from flowrl.rewards import Reward

WORDS = ["a", "cat", "dog", "fox", "red", "blue", "on", "the", "mat", "sitting", "##s"]
PROMPTS = ["a cat", "the red dogs sitting on a mat", "a blue fox"]
VIT = {"width": 128, "patch": 8, "image": 32, "depth": 2, "mlp": 256}  # 2 heads of 64, 16 patches
MED = {  # a med_config.json (BERT config) in BLIP's format, tiny
    "architectures": ["BertModel"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "pad_token_id": 0,
    "vocab_size": 5 + len(WORDS) + 2,  # specials, words, [DEC], [ENC]
    "encoder_width": 768,  # the reference overrides it with the ViT's width
    "add_cross_attention": True,
}


def tiny_reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the reference ``ImageReward``'s own key names (ImageReward.pt)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, d):
        return {f"{prefix}.weight": 1 + r(d), f"{prefix}.bias": r(d)}

    def lin(prefix, d_in, d_out):
        return {f"{prefix}.weight": r(d_out, d_in, scale=d_in**-0.5), f"{prefix}.bias": r(d_out)}

    D, v = VIT["width"], "blip.visual_encoder"
    n = (VIT["image"] // VIT["patch"]) ** 2
    sd = {f"{v}.cls_token": r(1, 1, D), f"{v}.pos_embed": r(1, n + 1, D)}
    sd |= {
        f"{v}.patch_embed.proj.weight": r(D, 3, VIT["patch"], VIT["patch"]),
        f"{v}.patch_embed.proj.bias": r(D),
    }
    for i in range(VIT["depth"]):
        b = f"{v}.blocks.{i}"
        sd |= ln(f"{b}.norm1", D) | lin(f"{b}.attn.qkv", D, 3 * D) | lin(f"{b}.attn.proj", D, D)
        sd |= ln(f"{b}.norm2", D) | lin(f"{b}.mlp.fc1", D, VIT["mlp"]) | lin(f"{b}.mlp.fc2", VIT["mlp"], D)
    sd |= ln(f"{v}.norm", D)
    H, t = MED["hidden_size"], "blip.text_encoder"
    sd |= {
        f"{t}.embeddings.word_embeddings.weight": r(MED["vocab_size"], H, scale=1.0),
        f"{t}.embeddings.position_embeddings.weight": r(MED["max_position_embeddings"], H),
        f"{t}.embeddings.position_ids": torch.arange(MED["max_position_embeddings"])[None],
    }
    sd |= ln(f"{t}.embeddings.LayerNorm", H)
    for i in range(MED["num_hidden_layers"]):
        layer = f"{t}.encoder.layer.{i}"
        for att, kv in (("attention", H), ("crossattention", D)):
            sd |= lin(f"{layer}.{att}.self.query", H, H) | lin(f"{layer}.{att}.self.key", kv, H)
            sd |= lin(f"{layer}.{att}.self.value", kv, H) | lin(f"{layer}.{att}.output.dense", H, H)
            sd |= ln(f"{layer}.{att}.output.LayerNorm", H)
        sd |= lin(f"{layer}.intermediate.dense", H, MED["intermediate_size"])
        sd |= lin(f"{layer}.output.dense", MED["intermediate_size"], H) | ln(f"{layer}.output.LayerNorm", H)
    sd |= lin("blip.vision_proj", D, 16) | lin("blip.text_proj", H, 16)  # BLIP_Pretrain's, unused
    for i, (a, b) in zip((0, 2, 4, 6, 7), ((H, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        sd |= lin(f"mlp.layers.{i}", a, b)
    return sd


def _attention(q, k, v, heads, mask=None):
    B, Lq, C = q.shape
    q, k, v = (x.reshape(B, x.shape[1], heads, C // heads).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / (C // heads) ** 0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, C)


def reference_score(sd, pixels, input_ids, attention_mask):
    """ImageReward.score_gard written out: timm ViT (pre-norm, eps 1e-6), BLIP's BERT (post-norm,
    self- then cross-attention per layer), the [CLS] feature through the MLP, (s - mean) / std."""
    v, D = "blip.visual_encoder", VIT["width"]

    def lin(x, p):
        return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def norm(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)

    x = F.conv2d(
        pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=VIT["patch"]
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}.cls_token"].expand(len(x), -1, -1), x], 1) + sd[f"{v}.pos_embed"]
    for i in range(VIT["depth"]):
        b = f"{v}.blocks.{i}"
        q, k, val = lin(norm(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, -1)
        x = x + lin(_attention(q, k, val, D // 64), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(norm(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image_embeds = norm(x, f"{v}.norm", 1e-6)

    t, heads = "blip.text_encoder", MED["num_attention_heads"]
    L = input_ids.shape[1]
    h = (
        sd[f"{t}.embeddings.word_embeddings.weight"][input_ids]
        + sd[f"{t}.embeddings.position_embeddings.weight"][:L]
    )
    h = norm(h, f"{t}.embeddings.LayerNorm", 1e-12)
    pad = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # BERT's extended mask
    for i in range(MED["num_hidden_layers"]):
        layer = f"{t}.encoder.layer.{i}"
        for att, kv, mask in (("attention", None, pad), ("crossattention", image_embeds, None)):
            kv = h if kv is None else kv
            a = _attention(
                lin(h, f"{layer}.{att}.self.query"),
                lin(kv, f"{layer}.{att}.self.key"),
                lin(kv, f"{layer}.{att}.self.value"),
                heads,
                mask,
            )
            h = norm(lin(a, f"{layer}.{att}.output.dense") + h, f"{layer}.{att}.output.LayerNorm", 1e-12)
        ff = lin(F.gelu(lin(h, f"{layer}.intermediate.dense")), f"{layer}.output.dense")
        h = norm(ff + h, f"{layer}.output.LayerNorm", 1e-12)
    s = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # no activations between the MLP's layers
        s = lin(s, f"mlp.layers.{i}")
    return ((s - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def write_checkpoint(folder, sd=None, fmt="pt"):
    """A model folder as a user downloads it: ImageReward.pt, med_config.json, a BERT tokenizer."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    sd = tiny_reference_state_dict() if sd is None else sd
    if fmt == "pt":
        torch.save(sd, folder / "ImageReward.pt")
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "ImageReward.safetensors")
    (folder / "med_config.json").write_text(json.dumps(MED))
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return sd


def tokens(folder):
    from flowrl.rewards.imagereward import load_tokenizer

    tok = load_tokenizer(folder)
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [16, 17]  # appended as in BLIP's init_tokenizer
    return tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_score_is_the_reference_forward_of_the_checkpoint(tmp_path, fmt):
    sd = write_checkpoint(tmp_path / "ir", fmt=fmt)
    reward = Reward([{"name": "imagereward", "kwargs": {"model": str(tmp_path / "ir")}}])
    assert reward.differentiable
    images = torch.rand(3, 3, VIT["image"], VIT["image"], generator=torch.Generator().manual_seed(1))
    values, info = reward(images, PROMPTS)
    ids = tokens(tmp_path / "ir")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference_score(sd, (images - mean) / std, ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-4)
    assert values.std() > 0.05 and "reward/imagereward" in info  # not a constant
    if fmt == "pt":  # differentiable in the images (ReFL's score_gard), through the resize too
        images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(3), requires_grad=True)
        values, _ = reward(images, PROMPTS)
        values.sum().backward()
        assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_mapping_round_trip(tmp_path):
    """A model built from config, saved under the reference's names (the inverse mapping written
    here), loads back through the loader (given the weights file) with the same scores."""
    from flowrl.rewards.imagereward import ImageRewardModel, configs_from_reference, load_imagereward

    write_checkpoint(tmp_path / "a")
    vision, text = configs_from_reference(tiny_reference_state_dict(), MED)
    vision.initializer_range = text.initializer_range = 0.02
    torch.manual_seed(0)
    net = ImageRewardModel(vision, text).eval()
    block = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
    }
    embed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed"}
    reference = {}
    for key, value in net.state_dict().items():
        if key.startswith("vision_model."):
            rest = key[len("vision_model.") :]
            rest = embed.get(rest, rest).replace("embeddings.patch_embedding", "patch_embed.proj")
            rest = rest.replace("post_layernorm", "norm").replace("encoder.layers.", "blocks.")
            for ours, theirs in block.items():
                rest = rest.replace(ours, theirs)
            key = "blip.visual_encoder." + rest
        elif key.startswith("text_encoder."):
            key = "blip." + key
        reference[key] = value.clone()
    unused = {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
    }
    assert set(reference) == set(tiny_reference_state_dict()) - unused - {
        "blip.text_encoder.embeddings.position_ids"
    }
    torch.save(reference, tmp_path / "a" / "ImageReward.pt")
    loaded, _ = load_imagereward(str(tmp_path / "a" / "ImageReward.pt"))
    ids = tokens(tmp_path / "a")
    pixels = torch.randn(3, 3, VIT["image"], VIT["image"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = net(pixels, ids["input_ids"], ids["attention_mask"])
        torch.testing.assert_close(loaded(pixels, ids["input_ids"], ids["attention_mask"]), ours)
        torch.testing.assert_close(
            reference_score(reference, pixels, ids["input_ids"], ids["attention_mask"]),
            ours,
            rtol=1e-4,
            atol=1e-4,
        )


def test_preprocess_is_torchvision_transform():
    """Resize(224, bicubic) of the short side, CenterCrop, Normalize: ReFL's transform of tensors."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    from flowrl.rewards.imagereward import preprocess

    transform = Compose(
        [
            Resize(32, interpolation=InterpolationMode.BICUBIC, antialias=True),
            CenterCrop(32),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    for shape in ((64, 50), (45, 96), (32, 32), (20, 20)):
        images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(preprocess(images, 32), transform(images))


def test_bad_files(tmp_path):
    from flowrl.rewards.imagereward import load_imagereward

    with pytest.raises(MissingFileError, match="not found"):
        load_imagereward(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="holds neither"):
        load_imagereward(str(tmp_path / "empty"))
    sd = tiny_reference_state_dict()
    write_checkpoint(tmp_path / "cut", {k: v for k, v in sd.items() if "blocks.1.mlp.fc2" not in k})
    with pytest.raises(InputError, match="do not fit"):
        load_imagereward(str(tmp_path / "cut"))
    (tmp_path / "cut" / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        load_imagereward(str(tmp_path / "cut"))
    (tmp_path / "cut" / "med_config.json").unlink()
    with pytest.raises(MissingFileError, match="med_config.json"):
        load_imagereward(str(tmp_path / "cut"))


def test_refl_takes_imagereward_and_refuses_ocr():
    """ReFL backpropagates its reward: imagereward (its paper's) is accepted, ocr is refused."""
    from flowrl.config import ConfigError, load_config

    cfg = load_config("tasks/jpeg_tiny.yaml", ["algorithm.name=refl", "rewards=[{name: imagereward}]"])
    assert [r.name for r in cfg.rewards] == ["imagereward"]
    with pytest.raises(ConfigError, match="'ocr' is not differentiable.*imagereward"):
        load_config("tasks/jpeg_tiny.yaml", ["algorithm.name=refl", "rewards=[{name: ocr}]"])

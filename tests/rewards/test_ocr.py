"""The OCR reward (Flow-GRPO's ``ocr``): the edit-distance score on known strings worked out by
hand, a tiny TrOCR whose decoder is set to read a known text, and Flow-GRPO's OCR prompt file
format through the prompt loader."""

import pytest
import torch

from flowrl.errors import InputError
from flowrl.rewards import Reward, RewardError
from flowrl.rewards.ocr import levenshtein, ocr_score, quoted_text


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("same", "same", 0),
        ("ab", "ba", 2),
    ],
)
def test_levenshtein_by_hand(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


@pytest.mark.parametrize(
    ("recognized", "target", "reward"),
    [
        ("Hello World", "hello world", 1.0),  # case and spaces ignored
        ("xx HELLO WORLD yy", "Hello World", 1.0),  # the target inside the text: distance 0
        ("helloworid", "Hello World", 1 - 1 / 10),  # one substitution over 10 characters
        ("ct", "cat", 1 - 1 / 3),  # one insertion
        ("", "cat", 0.0),  # nothing read: the full penalty
        ("a long unrelated sentence", "cat", 0.0),  # distance 20 clamped to len("cat") = 3
        ("cats", "cart", 1 - 2 / 4),  # lev("cats", "cart") = 2 (s -> r, insert t)
    ],
)
def test_score_is_flow_grpos_formula(recognized, target, reward):
    assert ocr_score(recognized, target) == pytest.approx(reward)


def test_quoted_text():
    assert quoted_text('A sign that says "Hello World", and "more"') == "Hello World"
    for bad in ("no quotes at all", 'one " quote', 'empty "  " quotes'):
        with pytest.raises(InputError, match="double quotes"):
            quoted_text(bad)


def _tiny_trocr(folder, token: str):
    """A random TrOCR saved as a model folder, its decoder set to emit ``token`` at every step:
    the last layer's final LayerNorm outputs its bias v at every position, and the output
    projection's row for ``token`` is v (the rest 0)."""
    from transformers import (
        TrOCRConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    from flowrl.models.tokenizer import offline_t5_tokenizer

    tok = offline_t5_tokenizer()
    encoder = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    decoder = TrOCRConfig(
        vocab_size=len(tok),
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = tok.pad_token_id, tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    net = VisionEncoderDecoderModel(config)
    if token is not None:
        with torch.no_grad():
            v = torch.randn(32)
            final = net.decoder.model.decoder.layers[-1].final_layer_norm
            final.weight.zero_()
            final.bias.copy_(v)
            proj = net.decoder.output_projection.weight
            proj.zero_()
            proj[tok.convert_tokens_to_ids(token)] = v
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)


def test_reward_reads_with_trocr(tmp_path):
    _tiny_trocr(tmp_path / "trocr", "7")  # reads "777777" in 6 tokens, whatever the image
    reward = Reward([{"name": "ocr", "kwargs": {"model": str(tmp_path / "trocr"), "max_new_tokens": 6}}])
    assert not reward.differentiable
    prompts = [
        'A sign that says "777777"',  # read exactly
        'A wall with "7 7" painted on it',  # inside the text read
        'A cake with "7777777778" written in icing',  # lev = 4 of 10
        'A poster reading "Hello"',  # lev("777777", "hello") = 6, clamped to 5
    ]
    images = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    values, info = reward(images, prompts)
    torch.testing.assert_close(values, torch.tensor([1.0, 1.0, 0.6, 0.0]))
    assert "reward/ocr" in info
    with pytest.raises(RewardError, match="double quotes"):
        reward(images[:1], ["a prompt without quoted text"])


def test_missing_model_folder(tmp_path):
    from flowrl.errors import MissingFileError
    from flowrl.rewards.ocr import load_trocr

    with pytest.raises(MissingFileError, match="cannot load the TrOCR model"):
        load_trocr(str(tmp_path / "nowhere"))


def test_random_trocr_plumbing(tmp_path):
    """An untouched random TrOCR: what it decodes, scored by the formula, is the reward."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    _tiny_trocr(tmp_path / "trocr", None)
    reward = Reward([{"name": "ocr", "kwargs": {"model": str(tmp_path / "trocr"), "max_new_tokens": 5}}])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ['a "cat"', 'a sign "Open 24 Hours"']
    values, _ = reward(images, prompts)
    net = VisionEncoderDecoderModel.from_pretrained(tmp_path / "trocr").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "trocr")
    tok = AutoTokenizer.from_pretrained(tmp_path / "trocr")
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        ids = net.generate(processor(images=list(arrays), return_tensors="pt").pixel_values, max_new_tokens=5)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    expected = [ocr_score(t, q) for t, q in zip(texts, ["cat", "Open 24 Hours"])]
    torch.testing.assert_close(values, torch.tensor(expected))
    assert ((values >= 0) & (values <= 1)).all()


def test_flow_grpo_ocr_prompt_files_load(tmp_path):
    """Flow-GRPO's dataset/ocr/{train,test}.txt: one prompt a line, the text to render in quotes;
    the folder loads as train/test splits, each file alone as a prompt file."""
    from flowrl.data.prompts import load_prompt_data, load_prompts

    train = [
        'A high-fashion runway with a sleek, modern backdrop displaying "Spring Collection 2024". Models walk on.',
        'A close-up of a smartwatch, the screen displaying "Step Goal Achieved" with an animation, at dusk.',
    ]
    test = [
        'A weathered journal page, with the phrase "Lost City Near" written in faded ink, it\'s mystical.'
    ]
    (tmp_path / "ocr").mkdir()
    (tmp_path / "ocr" / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (tmp_path / "ocr" / "test.txt").write_text("\n".join(test), encoding="utf-8")  # no final newline
    assert load_prompts(str(tmp_path / "ocr" / "train.txt")) == train
    data = load_prompt_data(str(tmp_path / "ocr"))
    assert data.prompts == train and data.metadata == [{}, {}]
    assert load_prompt_data(str(tmp_path / "ocr"), split="test").prompts == test
    assert [quoted_text(p) for p in train + test] == [
        "Spring Collection 2024",
        "Step Goal Achieved",
        "Lost City Near",
    ]


def test_flow_grpo_ocr_task_file(tmp_path):
    """tasks/flow_grpo_ocr_sd3.yaml: Flow-GRPO's objective with the ocr reward, its prompt folder's
    train split for training and test split for evaluation."""
    from flowrl.config import load_config
    from flowrl.data.prompts import load_eval_prompt_data, load_prompt_data

    (tmp_path / "ocr").mkdir()
    (tmp_path / "ocr" / "train.txt").write_text('A sign that says "Open"\nA cake with "Happy Birthday"\n')
    (tmp_path / "ocr" / "test.txt").write_text('A poster reading "Hello World"\n')
    cfg = load_config("tasks/flow_grpo_ocr_sd3.yaml", [f"train.prompts={tmp_path / 'ocr'}"])
    assert [r.name for r in cfg.rewards] == ["ocr"] and cfg.algorithm.name == "grpo"
    assert (cfg.algorithm.options.kl_estimator, cfg.algorithm.options.timestep_selection) == (
        "flow_grpo",
        "first",
    )
    assert load_prompt_data(cfg.train.prompts).prompts == [
        'A sign that says "Open"',
        'A cake with "Happy Birthday"',
    ]
    evaluation = load_eval_prompt_data(cfg.train.eval_prompts, cfg.train.prompts)
    assert [quoted_text(p) for p in evaluation.prompts] == ["Hello World"]

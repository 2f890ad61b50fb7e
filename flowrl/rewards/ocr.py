"""OCR reward for text rendering (Flow-GRPO's ``ocr`` reward: ``yifan123/flow_grpo``,
``flow_grpo/ocr.py`` ``OcrScorer``, Liu et al. 2025, arXiv 2505.05470).

The target is the prompt's first quoted text (``prompt.split('"')[1]``: ``A sign that says
"Hello World"`` -> ``Hello World``). With the recognised text r and the target t, both with
spaces removed and lowercased,

    d = 0 if t is a substring of r, else Levenshtein(r, t);   d = min(d, len(t))
    reward = 1 - d / len(t)          in [0, 1]

Recognition: transformers' TrOCR (``VisionEncoderDecoderModel``, Li et al. 2021, arXiv 2109.10282)
from a local folder or a hub id (default ``microsoft/trocr-base-printed``), greedy decoding of the
whole image as one line. Flow-GRPO uses PaddleOCR (text detection, then recognition of each box,
boxes joined); that difference and the error handling are stated in docs/faithful.md. Not
differentiable.
"""

from __future__ import annotations

import torch

from flowrl.errors import InputError, MissingFileError, one_line
from flowrl.rewards import register_reward


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions, each cost 1), as
    ``Levenshtein.distance``; one row of the Wagner-Fischer table at a time."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = row
    return prev[-1]


def quoted_text(prompt: str) -> str:
    """The text between the prompt's first pair of double quotes (Flow-GRPO's
    ``prompt.split('"')[1]``)."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise InputError(
            f"ocr reward: prompt {prompt!r} has no text in double quotes to render; write it as "
            'a sign that says "Hello World" (Flow-GRPO\'s OCR prompt format)'
        )
    return parts[1]


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's reward for one image: 1 - min(d, len(t)) / len(t), spaces removed, lowercased;
    d = 0 when the target occurs in the recognised text."""
    r = recognized.replace(" ", "").lower()
    t = target.replace(" ", "").lower()
    d = 0 if t in r else levenshtein(r, t)
    return 1 - min(d, len(t)) / len(t)


def load_trocr(model: str, device: str | torch.device = "cpu"):
    """(VisionEncoderDecoderModel in eval mode, image processor, tokenizer) from a folder or hub id."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    try:
        net = VisionEncoderDecoderModel.from_pretrained(model)
        processor, tokenizer = AutoImageProcessor.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    except OSError as e:  # no such folder or hub repo, offline, or a folder without the processor
        raise MissingFileError(
            f"ocr reward: cannot load the TrOCR model {model!r} ({one_line(e)[:200]}); give a folder holding "
            "a VisionEncoderDecoder model, its image processor and tokenizer, or a hub id "
            "(microsoft/trocr-base-printed)"
        ) from None
    return net.to(device).eval().requires_grad_(False), processor, tokenizer


@register_reward("ocr")
def ocr(
    model: str = "microsoft/trocr-base-printed",
    max_new_tokens: int = 32,
    device: str | torch.device = "cpu",
):
    """``model``: a TrOCR folder (model, image processor and tokenizer) or a hub id;
    ``max_new_tokens``: the longest text read."""
    net, processor, tokenizer = load_trocr(model, device)

    def reward_fn(images, prompts, metadata):
        targets = [quoted_text(p) for p in prompts]
        # as Flow-GRPO's ocr_score: the images as uint8 arrays (B, H, W, 3)
        arrays = (
            (images.detach().float().clamp(0, 1) * 255)
            .round()
            .to(torch.uint8)
            .permute(0, 2, 3, 1)
            .cpu()
            .numpy()
        )
        pixels = processor(images=list(arrays), return_tensors="pt").pixel_values.to(device)
        with torch.no_grad():
            ids = net.generate(pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        values = torch.tensor([ocr_score(r, t) for r, t in zip(texts, targets)], dtype=torch.float32)
        return values, {}

    return reward_fn
